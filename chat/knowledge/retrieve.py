"""Retrieve, then prompt: the one path by which a reply of any model kind
(local, Ollama, OpenAI-compatible) draws on knowledge bases (CONTRACT §8).

The knowledge worker runs `reply_retrieve` before the reply is dispatched
(workers/knowledge_tasks.py): the query is the user's turn, embedded on
the CPU with the same weights the GPU worker loads (so the vectors match
those of the index, and a reply never waits for the GPU or takes it back:
docs/knowledge.md); each base is searched (hybrid, chat/knowledge/search.py);
the best passages over all bases, within the prompt's budget, are stored on
the reply as its sources and sent as `chat.sources`, before any delta. The
reply's generation, wherever it runs, puts them into the prompt with
numbered tags (`prompt_with_sources`), and the model may cite them as [n].
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path

from django.conf import settings

from chat.catalog import ModelChoice
from chat.knowledge.search import Hit, Index
from chat.models import KnowledgeBase, KnowledgeChunk, KnowledgeStatus, Message

log = logging.getLogger(__name__)

#: Indexes kept open per process, least recently used dropped first.
INDEXES_KEPT = 16
#: A passage cut to fit the budget keeps at least this many tokens, or is left out.
PASSAGE_MIN_TOKENS = 32


class _Indexes:
    """Open indexes by path: an index never changes once written (a new
    one gets a new directory), so a path's index can be kept."""

    def __init__(self) -> None:
        self._open: OrderedDict[str, Index] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, relative: str) -> Index:
        with self._lock:
            index = self._open.get(relative)
            if index is not None:
                self._open.move_to_end(relative)
                return index
        index = Index.load(Path(settings.KNOWLEDGE_DIR) / relative)
        with self._lock:
            self._open[relative] = index
            while len(self._open) > INDEXES_KEPT:
                self._open.popitem(last=False)
        return index


indexes = _Indexes()


def sources_find(*, query: str, bases: list[KnowledgeBase], embedders, budget_tokens: int,
                 k: int | None = None) -> list[dict]:
    """The best passages for `query` over `bases`, best first, numbered from
    1, cut to `budget_tokens` in all. `embedders(name)`: the embedder of
    that model (a base is searched with the model its index was built with)."""
    k = k or settings.KNOWLEDGE_TOP_K
    vectors: dict[str, object] = {}
    ranked: list[tuple[float, KnowledgeBase, Hit]] = []
    for base in bases:
        if not base.index_path or not base.chunk_count:
            continue
        embedder = embedders(base.embedding_model)
        if base.embedding_model not in vectors:
            vectors[base.embedding_model] = embedder.embed([query], kind="query")[0]
        index = indexes.get(base.index_path)
        ranked.extend((hit.score, base, hit) for hit in index.search(query, vectors[base.embedding_model],
                                                                     model=base.embedding_model, k=k))
    ranked.sort(key=lambda entry: -entry[0])
    ranked = ranked[:k]
    chunks = {}
    for base in {b.pk: b for _, b, _ in ranked}.values():
        positions = [hit.chunk for _, b, hit in ranked if b.pk == base.pk]
        for chunk in KnowledgeChunk.objects.filter(base=base, position__in=positions).select_related("document"):
            chunks[(base.pk, chunk.position)] = chunk
    sources, left = [], budget_tokens
    counter = embedders(bases[0].embedding_model).token_count if bases else len
    for score, base, hit in ranked:
        chunk = chunks.get((base.pk, hit.chunk))
        if chunk is None or left < PASSAGE_MIN_TOKENS:
            continue
        text = chunk.text
        tokens = counter(text)
        if tokens > left:  # cut to what is left, by the ratio of characters to tokens
            text = text[:max(1, len(text) * left // tokens)].rstrip() + " …"
            tokens = left
        left -= tokens
        sources.append({"n": len(sources) + 1, "document": chunk.document.name, "text": text,
                        "score": round(score, 6), "knowledge": base.pk})
    return sources


def prompt_budget(choice: ModelChoice) -> int:
    """Tokens the passages may take: KNOWLEDGE_PROMPT_TOKENS, and for a
    local model at most a quarter of its context (its config.json), so
    that the conversation and the reply still fit."""
    budget = settings.KNOWLEDGE_PROMPT_TOKENS
    if choice.kind == "local":
        try:
            config = json.loads((Path(choice.upstream) / "config.json").read_text())
            context = int(config.get("max_position_embeddings") or config.get("n_positions") or 0)
        except (OSError, ValueError):
            context = 0
        if context:
            budget = min(budget, context // 4)
    return budget


def query_of(reply: Message) -> str:
    """The user's turn this reply answers."""
    turn = reply.conversation.messages.filter(pk__lt=reply.pk, role=Message.Role.USER).order_by("-pk").first()
    return turn.content if turn else ""


def bases_of(reply: Message) -> list[KnowledgeBase]:
    """The reply's bases that are still the user's and ready."""
    return list(KnowledgeBase.objects.filter(pk__in=reply.knowledge or [], user_id=reply.conversation.user_id,
                                             status=KnowledgeStatus.READY))


def prompt_with_sources(messages: list[dict], sources: list[dict] | None) -> list[dict]:
    """The chat messages with the sources put before the last user turn,
    each tagged [n], and how to cite them. In the user's turn rather than
    a system message: every chat template takes a user turn, not every one
    a system message."""
    if not sources or not messages or messages[-1]["role"] != "user":
        return messages
    passages = "\n\n".join(f"[{s['n']}] ({s['document']})\n{s['text']}" for s in sources)
    guide = ("Use these sources where they help, and cite each one you use as [n] right after what it "
             f"supports.\n\nSources:\n{passages}\n\nQuestion: ")
    question = messages[-1]["content"]
    if isinstance(question, list):  # a /v1 turn in parts (text and images): the guide goes first
        return [*messages[:-1], {**messages[-1], "content": [{"type": "text", "text": guide}, *question]}]
    return [*messages[:-1], {**messages[-1], "content": guide + question}]
