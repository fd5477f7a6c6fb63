"""The test suite's fake Ollama and OpenAI servers in a process of their own
(as a real Ollama is), tunable while they run:

    POST /_bench/config {"reply": "...", "token_delay": 0.0}   set attributes, forget recordings
    GET  /_bench/stats                                          generations and their peak concurrency
    GET  /_bench/recordings                                     the recordings themselves (time.time()):
                                                                generations, residency, loads

    .venv/bin/python bench/fakes.py --ready-file PATH   # writes {"ollama": URL, "openai": URL}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakes import http  # noqa: E402
from tests.fakes.ollama import FakeOllama  # noqa: E402
from tests.fakes.openai import FakeOpenAI  # noqa: E402

# socketserver's listen backlog is 5: 50 clients connecting at once (the
# 50-socket floor) overflow it and get their connections reset. Ollama (Go)
# listens with the system's maximum.
http._HTTPServer.request_queue_size = 1024

TUNABLE = {"reply", "token_delay", "unload_delay", "load_delay"}


def peak_concurrency(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = now = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


class _Tunable:
    def handle(self, h) -> None:
        if h.route == "/_bench/config" and h.command == "POST":
            for key, value in (h.body or {}).items():
                if key in TUNABLE:
                    setattr(self, key, value)
            self.clear()  # recordings grow with every request: keep them per run
            return h.send_json(200, {k: getattr(self, k) for k in TUNABLE if hasattr(self, k)})
        if h.route == "/_bench/stats" and h.command == "GET":
            generations = list(getattr(self, "generations", []))
            return h.send_json(200, {"generations": len(generations),
                                     "peak_concurrency": peak_concurrency(generations)})
        if h.route == "/_bench/recordings" and h.command == "GET":
            # Ollama's own log, for I1 checked against the GPU events
            # (bench/switch_load.py, as tests/test_arbitration.py does).
            return h.send_json(200, {"generations": list(getattr(self, "generations", [])),
                                     "residency": [list(r) for r in getattr(self, "residency", [])],
                                     "loads": list(getattr(self, "loads", []))})
        return super().handle(h)


class BenchOllama(_Tunable, FakeOllama):
    pass


class BenchOpenAI(_Tunable, FakeOpenAI):
    def _chat(self, h) -> None:
        # The OpenAI fake records no generations; the bench wants them too.
        import time

        started = time.time()
        try:
            super()._chat(h)
        finally:
            self.generations.append((started, time.time()))

    def clear(self) -> None:
        super().clear()
        self.generations = []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ready-file", type=Path, required=True)
    args = parser.parse_args()
    ollama = BenchOllama(models=("qwen:7b",), reply="Hello from fake Ollama.", token_delay=0.0, unload_delay=0.0)
    openai = BenchOpenAI(reply="Hello from fake OpenAI.", token_delay=0.0)
    openai.generations = []
    ollama.start()
    openai.start()
    tmp = args.ready_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"ollama": ollama.url, "openai": openai.url, "openai_key": openai.api_key,
                               "pid": os.getpid()}))
    tmp.replace(args.ready_file)
    threading.Event().wait()


if __name__ == "__main__":
    main()
