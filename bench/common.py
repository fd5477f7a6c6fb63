"""What every benchmark shares: statistics over repeats, the machine it ran
on, a printed table and the JSON file under bench/results/.

A figure is always a median over repeats with its spread (min–max), set
beside a floor measured in the same run (issue 6): never an absolute time
alone, never an assertion.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
#: Where benchmarks keep what is slow to make and safe to reuse (the 1 GB
#: model): under var/, which git ignores and `make clean` removes.
CACHE = ROOT / "var" / "bench"


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0–100), linear between the closest ranks."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def spread(values: list[float]) -> dict:
    """Median and spread of one figure over repeats."""
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def fmt(stat: dict, unit: str = "", scale: float = 1.0, digits: int = 1, sign: bool = False) -> str:
    """`12.3 ms (11.9–13.0)`: the median, then the spread over repeats."""
    if stat.get("median") is None:
        return "n/a"
    number = f"{{:{'+' if sign else ''}.{digits}f}}"
    median = number.format(stat["median"] * scale)
    if stat["n"] < 2:
        return f"{median}{unit}"
    low, high = number.format(stat["min"] * scale), number.format(stat["max"] * scale)
    return f"{median}{unit} ({low}…{high})"


def machine() -> dict:
    """The conditions a figure depends on, written next to it."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform()}


_started: dict[str, dict] = {}


def mark(name: str) -> None:
    """Note when benchmark `name` began and how loaded the machine was then
    (several benchmarks can be measured before any is written)."""
    _started[name] = {"date": _now(), "load_average": _load()}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _load():
    try:
        return os.getloadavg()
    except OSError:
        return None


def _relative(arg: str) -> str:
    path = Path(arg)
    return str(path.relative_to(ROOT)) if path.is_absolute() and path.is_relative_to(ROOT) else arg


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [title, line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    return "\n".join(out)


def results_write(name: str, *, tables: list[dict], figures: dict, notes: list[str] = ()) -> Path:
    """Print the tables and write bench/results/NAME.json (via a temporary
    file, so that an interrupted run leaves the previous figures intact)."""
    for t in tables:
        print()
        print(table(t["title"], t["header"], t["rows"]))
    for note in notes:
        print(f"note: {note}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    document = {
        "benchmark": name,
        "started": _started.get(name, {"date": _now(), "load_average": _load()}),
        "finished": {"date": _now(), "load_average": _load()},
        "command": " ".join([Path(sys.executable).name, *(_relative(a) for a in sys.argv)]),
        "machine": machine(),
        "tables": tables,
        "notes": list(notes),
        "figures": figures,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path.relative_to(ROOT)}")
    return path
