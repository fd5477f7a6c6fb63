"""Run a fake outside server by hand, to try the stack without a real one:

    .venv/bin/python -m tests.fakes ollama --port 11434
    .venv/bin/python -m tests.fakes openai --port 8001   # OPENAI_BASE_URL=http://127.0.0.1:8001/v1, key sk-test
"""
import argparse
import threading

from tests.fakes.ollama import FakeOllama
from tests.fakes.openai import FakeOpenAI


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes")
    parser.add_argument("server", choices=["ollama", "openai"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-delay", type=float, default=0.02, help="seconds between streamed tokens")
    parser.add_argument("--unload-delay", type=float, default=0.3, help="Ollama: seconds /api/ps lists an unloaded model")
    args = parser.parse_args()
    if args.server == "ollama":
        fake = FakeOllama(port=args.port, token_delay=args.token_delay, unload_delay=args.unload_delay,
                          models=("qwen:7b", "llama3.2:1b"))
    else:
        fake = FakeOpenAI(port=args.port, token_delay=args.token_delay)
    fake.start()
    print(f"fake {args.server} on {fake.url} (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
