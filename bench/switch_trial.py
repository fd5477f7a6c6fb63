"""A trial of the GPU switch against a running stack (`make run`): logs in,
chats local_demo -> an Ollama model -> local_demo -> local_demo over the
real websocket, and prints time to first token, the gpu.switch frames
(freed bytes, seconds) and the last GPU events from /api/gpu/.

    .venv/bin/python bench/switch_trial.py [BASE_URL] [OLLAMA_MODEL]

Defaults: http://127.0.0.1:8000, ollama_qwen:7b; logs in as admin with
the password `make run` saved in var/admin-password.txt.
"""
import asyncio
import json
import re
import sys
import time
from pathlib import Path

import httpx
import websockets

BASE = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
OLLAMA_MODEL = sys.argv[2] if len(sys.argv) > 2 else "ollama_qwen:7b"
PW = (Path(__file__).resolve().parent.parent / "var" / "admin-password.txt").read_text().strip()


def login() -> httpx.Client:
    client = httpx.Client(base_url=BASE)
    page = client.get("/accounts/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    answer = client.post("/accounts/login/",
                         data={"username": "admin", "password": PW, "csrfmiddlewaretoken": token})
    if answer.status_code != 302:
        raise SystemExit(f"login failed ({answer.status_code})")
    return client


async def chat(ws, model: str, content: str, conversation):
    started = time.perf_counter()
    await ws.send(json.dumps({"type": "chat.send", "model": model, "content": content,
                              "conversation": conversation, "client_id": "trial"}))
    text, first, switches = "", None, []
    while True:
        frame = json.loads(await ws.recv())
        if frame["type"] == "chat.accepted":
            conversation = frame["conversation"]
        elif frame["type"] == "chat.delta":
            first = first or time.perf_counter() - started
            text += frame["text"]
        elif frame["type"] == "gpu.switch":
            switches.append(frame)
        elif frame["type"] in ("chat.done", "chat.error"):
            total = time.perf_counter() - started
            ttft = f"{first * 1000:.0f} ms" if first else "-"
            print(f"{model:16} {frame['type']:10} {frame.get('finish_reason') or frame.get('detail')}"
                  f"  first token {ttft}, total {total * 1000:.0f} ms  {text[:30]!r}")
            for s in switches:
                extra = f" freed {s['freed_bytes']} bytes" if s.get("freed_bytes") else ""
                secs = f" in {s['seconds']:.3f} s" if s.get("seconds") else ""
                print(f"    gpu.switch {s['phase']:16} {s.get('model') or s.get('endpoint', '')}{extra}{secs}")
            return conversation


async def main() -> None:
    client = login()
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    url = BASE.replace("http", "ws", 1) + "/ws/chat/"
    async with websockets.connect(url, additional_headers={"Cookie": cookie, "Origin": BASE}) as ws:
        conversation = None
        for model in ["local_demo", OLLAMA_MODEL, "local_demo", "local_demo"]:
            conversation = await chat(ws, model, "Hello there", conversation)
    print("last GPU events (/api/gpu/):")
    for e in client.get("/api/gpu/").json()["events"][-6:]:
        print(f"    {e['kind']:13} {e['model']:12} freed {e['freed_bytes']:>12} bytes  {e['seconds']:.3f} s")


if __name__ == "__main__":
    asyncio.run(main())
