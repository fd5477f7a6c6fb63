"""What the fake *model* says, the same behind both fake servers.

The servers (``ollama.py``, ``openai.py``) own their wire formats; this
module owns the answer itself, deterministically, so a test can predict it:

* a tool call's arguments and a structured (JSON) reply are built from the
  request's JSON schema: each required property gets a value by its type
  (``schema_value``);
* a reply is cut at the first stop string or after the token limit, as a
  real runner stops generating (``cut``);
* embeddings are unit vectors drawn from a hash of the text; the first ``d``
  components of a longer vector, renormalised, are the ``d``-dimensional one,
  which is what Ollama's and OpenAI's ``dimensions`` do (Matryoshka
  truncation).  Components are float32, as both servers compute them.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
from typing import Any

from .http import split_tokens

__all__ = ["EMBEDDING_DIM", "STRING_VALUE", "schema_value", "structured_reply", "cut",
           "images_note", "tool_result_reply", "supports_embeddings", "embedding",
           "embedding_base64"]

#: Length of a vector when the request does not ask for ``dimensions``.
EMBEDDING_DIM = 8
#: What a string property gets when its schema has no ``enum``.
STRING_VALUE = "Paris"


def schema_value(schema: Any) -> Any:
    """A deterministic value that validates against the JSON ``schema``:
    the first ``enum`` value, else by type: string ``"Paris"``, number and
    integer 1, boolean true, array [], null None, object with each
    *required* property filled the same way."""
    if not isinstance(schema, dict):
        return {}
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return schema_value(schema[key][0])
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):  # ["string", "null"]: the first real type
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: schema_value(props.get(name, {})) for name in schema.get("required") or []}
    return {"string": STRING_VALUE, "number": 1, "integer": 1, "boolean": True,
            "array": [], "null": None}.get(kind, STRING_VALUE)


def structured_reply(fmt: Any, text: str) -> str:
    """The reply under a JSON constraint: ``"json"`` (any object) wraps the
    plain ``text`` as ``{"answer": text}``; a schema gets ``schema_value``."""
    value = {"answer": text} if fmt == "json" or not isinstance(fmt, dict) else schema_value(fmt)
    return json.dumps(value)


def cut(text: str, *, stop: Any = None, limit: Any = None) -> tuple[list[str], str]:
    """Tokens of ``text`` as generated, and why generation ended.

    Ends before the first occurrence of any ``stop`` string (str or list;
    the stop string itself is not sent) with ``"stop"``, or after ``limit``
    tokens with ``"length"`` when that comes first; ``limit`` <= 0 or None is
    no limit (Ollama's ``num_predict`` -1)."""
    stops = [stop] if isinstance(stop, str) else [s for s in stop or [] if isinstance(s, str)]
    hits = [text.find(s) for s in stops if s and s in text]
    if hits:
        text = text[:min(hits)]
    tokens = split_tokens(text)
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < len(tokens):
        return tokens[:limit], "length"
    return tokens, "stop"


def images_note(count: int) -> str:
    """What a vision model says first about the images it was shown."""
    return f"I see {count} image{'' if count == 1 else 's'}. " if count else ""


def tool_result_reply(content: str) -> str:
    """The answer to a conversation whose last message is a tool's result."""
    return f"The tool said: {content}"


def supports_embeddings(model: str) -> bool:
    """Embedding models are told apart by name: ``nomic-embed-text``,
    ``text-embedding-3-small``, ``mxbai-embed-large``, ``embeddinggemma``."""
    return "embed" in model.lower()


def embedding(text: str, dim: int = EMBEDDING_DIM) -> list[float]:
    """A unit vector of ``dim`` float32 components from a hash of ``text``."""
    raw = hashlib.shake_256(text.encode()).digest(4 * dim)
    values = [n / 2**31 - 1.0 for n in struct.unpack(f"<{dim}I", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    # Round-trip through float32, so the float and base64 answers agree exactly.
    return list(struct.unpack(f"<{dim}f", struct.pack(f"<{dim}f", *(v / norm for v in values))))


def embedding_base64(vector: list[float]) -> str:
    """OpenAI's ``encoding_format: "base64"``: little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
