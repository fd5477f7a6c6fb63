"""Fakes of the outside servers this service talks to (Ollama, OpenAI).

Real HTTP servers on 127.0.0.1 speaking the real wire protocols, so the
official ``ollama`` and ``openai`` clients work against them unchanged::

    with FakeOllama(models=("qwen:7b",)) as fake:
        ollama.Client(host=fake.url).chat(model="qwen:7b", messages=[...])
"""
from .http import FakeServer, Recorded, split_tokens
from .ollama import FakeOllama
from .openai import FakeOpenAI

__all__ = ["FakeOllama", "FakeOpenAI", "FakeServer", "Recorded", "split_tokens"]
