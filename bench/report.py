"""Print bench/results/*.json as Markdown tables, for docs/BENCHMARKS.md.

    .venv/bin/python bench/report.py [NAME ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ("swap", "dispatch", "streaming", "local_generation", "concurrency", "batch", "knowledge")


def markdown(table: dict) -> str:
    cell = lambda value: str(value).replace("|", "\\|")  # noqa: E731
    lines = [f"**{table['title']}**", "",
             "| " + " | ".join(cell(h) for h in table["header"]) + " |",
             "|" + "---|" * len(table["header"])]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table["rows"]]
    return "\n".join(lines)


def main() -> None:
    names = sys.argv[1:] or [n for n in ORDER if (RESULTS / f"{n}.json").exists()]
    for name in names:
        doc = json.loads((RESULTS / f"{name}.json").read_text())
        started, finished = doc["started"], doc["finished"]
        load = [x["load_average"][0] for x in (started, finished) if x.get("load_average")]
        print(f"### {name}\n")
        print(f"`{doc['command']}`, {started['date']}, {doc['machine']['cpus']} cores"
              + (f", 1-minute load average {load[0]:.1f} at the start, {load[-1]:.1f} at the end" if load else "")
              + "\n")
        for table in doc["tables"]:
            print(markdown(table) + "\n")
        for note in doc.get("notes", []):
            print(f"- {note}")
        print()


if __name__ == "__main__":
    main()
