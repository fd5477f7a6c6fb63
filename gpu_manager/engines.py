"""A local model loaded in-process with transformers: load, generate, unload.

An engine holds the only strong references to its model and tokenizer, so
that unloading can prove the memory is gone: it keeps weakrefs, drops its
references, releases memory, and reports any object that survived together
with who still refers to it.
"""
from __future__ import annotations

import gc
import logging
import re
import threading
import time
import types
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from tokenizers.decoders import DecodeStream
from transformers import (
    AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, LogitsProcessorList, StoppingCriteria,
    StoppingCriteriaList, TextStreamer,
)
from transformers.generation.streamers import BaseStreamer

from chatsite.errors import CodedError
from gpu_manager.generation import (
    GenerationRefused, Penalties, StopText, sequence_bias, template_takes_tools, tool_calls_parse,
)
from gpu_manager.memory import memory_release

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled" | "tool_calls"
    #: Tool calls read out of the text: (name, arguments) dicts.
    tool_calls: list[dict] = field(default_factory=list)


class EngineLoadError(CodedError):
    code = "model_load_failed"


class _TextRelay(TextStreamer):
    """Hands decoded text to `on_text` as generate() produces it, in the
    generating thread: no second thread, no queue to lose text in.
    TextStreamer holds back partial words and multi-byte characters until
    they decode cleanly.

    It decodes all the tokens since the last newline at every token (a cost
    per token that grows with the line): only for tokenizers that
    `_StreamRelay` cannot serve."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text
        self.parts: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.parts.append(text)
            self.on_text(text)


class _StreamRelay(BaseStreamer):
    """`_TextRelay` at a constant cost per token: the tokenizers library's
    own incremental decoder (DecodeStream, in Rust) turns each new token
    into the text it adds, about 3 µs a token, where TextStreamer decodes
    the whole line so far through the Python tokenizer wrapper at every
    token: 0.07 ms a token on average over a 256-token line, growing with
    the line, against 0.45 ms a token for the demo model itself (+10 % per
    token in all). Text goes to `on_text` in the generating thread as soon as it
    decodes cleanly (a character split over tokens waits for its last
    byte); what is still held at the end goes out then, so the pieces add
    up to the decode of all the generated tokens."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.on_text = on_text
        self.parts: list[str] = []
        self.ids: list[int] = []
        self._stream = DecodeStream(skip_special_tokens=True)
        self._prompt = True  # generate() puts the prompt first: skipped
        self._held = 0  # tokens since the last piece of text

    @staticmethod
    def fits(tokenizer) -> bool:
        """A fast tokenizer whose decode() is its backend's decode alone (no
        clean-up of spaces after it, which the stream would not apply)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return False
        if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            return True
        # transformers skips the clean-up for BPE unless forced (tokenization_utils_tokenizers._decode).
        return type(backend.model).__name__ == "BPE" and not getattr(
            tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)

    def put(self, value) -> None:
        if self._prompt:
            self._prompt = False
            return
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError("streaming supports batch size 1 only")
            value = value[0]
        ids = value.tolist()
        self.ids.extend(ids)
        text = self._stream.step(self.backend, ids)
        if text:
            self._held = 0
            self.parts.append(text)
            self.on_text(text)
        else:
            self._held += len(ids)

    def end(self) -> None:
        """Hand over what the stream still holds (an incomplete character at
        the very end decodes as U+FFFD, as a full decode would show it)."""
        if self._held:
            sent = "".join(self.parts)
            full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            tail = full[len(sent):] if full.startswith(sent) else self.tokenizer.decode(
                self.ids[-self._held:], skip_special_tokens=True)
            self._held = 0
            if tail:
                self.parts.append(tail)
                self.on_text(tail)
        self._prompt = True


def _relay(tokenizer, on_text: Callable[[str], None]) -> _StreamRelay | _TextRelay:
    return (_StreamRelay if _StreamRelay.fits(tokenizer) else _TextRelay)(tokenizer, on_text)


class _StopWhen(StoppingCriteria):
    """Stops generation after the current token when `should_stop()` says
    so (finish "cancelled"), once `deadline` (time.monotonic()) passed
    (finish "length": the reply is cut short, as by a token limit), or when
    `matched()` says a stop sequence came (finish "stop")."""

    def __init__(self, should_stop: Callable[[], bool], deadline: float | None,
                 matched: Callable[[], bool] = lambda: False):
        self.should_stop = should_stop
        self.deadline = deadline
        self.matched = matched
        self.reason = ""
        self._answers: dict[tuple, torch.Tensor] = {}

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        if not self.reason:
            if self.matched():
                self.reason = "stop"
            elif self.should_stop():
                self.reason = "cancelled"
            elif self.deadline is not None and time.monotonic() >= self.deadline:
                self.reason = "length"
        # One tensor per answer, made once, not an allocation (and on cuda a
        # kernel launch) per token: generate() only reads it.
        key = (input_ids.shape[0], input_ids.device, bool(self.reason))
        answer = self._answers.get(key)
        if answer is None:
            answer = self._answers[key] = torch.full(key[:1], key[2], dtype=torch.bool, device=key[1])
        return answer


class LocalEngine:
    def __init__(self, *, name: str, path: str, device: str, keep_alive: float = 0.0,
                 warm_offload: bool = False):
        self.name = name
        self.path = path
        self.device = device
        #: Seconds unused before the GPU worker unloads it (0 = never).
        self.keep_alive = keep_alive
        #: Unloading keeps the weights in host memory for a fast way back.
        self.warm_offload = warm_offload
        self.model = None
        self.tokenizer = None
        self.offloaded = False
        self.last_used = time.monotonic()
        #: The LocalSpec options it was made with (`engine_create`).
        self.spec_options: tuple = ()

    @property
    def loaded(self) -> bool:
        """Resident on the device and ready to generate."""
        return self.model is not None and not self.offloaded

    @property
    def nbytes(self) -> int:
        """Bytes of weights and buffers: what the model costs the device."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        """The model's weights and buffers (none when it is not loaded)."""
        if self.model is None:
            return []
        return list(self.model.parameters()) + list(self.model.buffers())

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def offload(self) -> None:
        """Warm unload: move the weights to host memory (pinned on cuda, so
        the way back is a fast DMA copy) and free the device, keeping the
        model object: vLLM's "sleep level 1". On cpu the weights already
        live in host memory; nothing moves and nothing is freed."""
        if self.device != "cpu":
            self.model.to("cpu")
            for tensor in self._tensors():
                tensor.data = tensor.data.pin_memory()
            memory_release(self.device)
        self.offloaded = True

    def restore(self) -> None:
        """Undo `offload`: copy the weights back onto the device."""
        if self.device != "cpu":
            self.model.to(self.device, non_blocking=True)
            torch.cuda.synchronize()
            # The pinned host copy is freed with its last reference; hand
            # the host allocator's cached blocks back too (no gc needed).
            torch.accelerator.empty_host_cache()
        self.offloaded = False
        self.touch()

    #: The transformers class that loads this kind of engine.
    model_class = AutoModelForCausalLM

    def load(self) -> None:
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            # dtype "auto" keeps the checkpoint's dtype; device_map puts the
            # weights straight onto the device instead of via a cpu copy.
            self.model = self.model_class.from_pretrained(self.path, dtype="auto", device_map=self.device)
        except (OSError, ValueError) as exc:
            self.model = self.tokenizer = None
            raise EngineLoadError(f"Cannot load {self.name} from {self.path}: {exc}") from exc
        self.model.eval()

    def unload(self) -> dict[str, list[str]]:
        """Drop the model and tokenizer and release their memory. Returns the
        objects still alive afterwards, each with who holds it (empty when
        all is freed)."""
        # No local variable may hold the objects themselves: a name bound
        # here (even by a walrus in a comprehension) would keep one alive.
        refs = {
            f"{self.name}.{attr}": weakref.ref(getattr(self, attr))
            for attr in ("model", "tokenizer")
            if getattr(self, attr) is not None
        }
        # The model can be freed while one of its layers is not (a layer in
        # a reference cycle): the weights themselves are watched too.
        weights = [weakref.ref(t) for t in self._tensors()]
        self.model = self.tokenizer = None
        self.offloaded = False
        # Reference counting frees everything at once unless a cycle holds
        # some of it; only then is the full collection worth its 0.15–0.2 s
        # per switch (docs/BENCHMARKS.md, finding 4).
        in_cycle = any(ref() is not None for ref in (*refs.values(), *weights))
        memory_release(self.device, collect=in_cycle)
        survivors = {}
        for label, ref in refs.items():
            if ref() is not None:
                survivors[label] = _holders(ref())
        alive = [ref for ref in weights if ref() is not None]
        if alive and f"{self.name}.model" not in survivors:  # the model went, some of its weights did not
            survivors[f"{self.name}.weights"] = [f"{len(alive)} of {len(weights)} tensors",
                                                 *_holders(alive[0]())]
        for label, holders in survivors.items():
            log.warning("unload of %s left %s alive, held by %s", self.name, label, holders)
        return survivors

    @torch.inference_mode()
    def generate(
        self, messages: list[dict], *, max_new_tokens: int, temperature: float, top_p: float,
        on_text: Callable[[str], None], should_stop: Callable[[], bool], deadline: float | None = None,
        stop: list[str] | tuple[str, ...] = (), seed: int | None = None, presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0, logit_bias: dict[int, float] | None = None, tools: list[dict] | None = None,
    ) -> GenerationResult:
        """Generate a reply to `messages`, handing text to `on_text` as it
        decodes. Stops early when `should_stop()` turns true, or at the first
        token after `deadline` (a time.monotonic() value), if given.

        A request's options (issue 16, chat/params.py `local_arguments`):
        `stop` sequences end the reply before them (finish "stop"); `seed`
        makes sampling repeatable; OpenAI's penalties and `logit_bias` (this
        model's token ids) shape the logits. With `tools`, the chat template
        renders them (GenerationRefused when it cannot), and the text is
        handed over once whole, without the tool calls read out of it:
        streamed, the markup of a call would reach the client as text."""
        if not self.loaded:
            raise RuntimeError(f"{self.name} is not loaded")
        if tools and not template_takes_tools(self.tokenizer):
            raise GenerationRefused(f"{self.name}'s chat template does not take tools.")
        self.touch()
        inputs = self.tokenizer.apply_chat_template(
            messages, tools=tools or None, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.model.device)
        prompt_tokens = inputs["input_ids"].shape[1]
        # With tools, the text goes out once whole (below), so nothing streams.
        stops = StopText(stop, (lambda text: None) if tools else on_text)
        relay = _relay(self.tokenizer, stops.push)
        halt = _StopWhen(should_stop, deadline, matched=lambda: stops.hit)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
            "do_sample": False}
        if seed is not None:
            torch.manual_seed(seed)  # every device's generator; the worker generates one reply at a time
        processors = LogitsProcessorList()
        if presence_penalty or frequency_penalty:
            processors.append(Penalties(prompt_tokens=prompt_tokens, presence=presence_penalty,
                                        frequency=frequency_penalty))
        output = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens, streamer=relay,
            stopping_criteria=StoppingCriteriaList([halt]), logits_processor=processors,
            sequence_bias=sequence_bias(logit_bias or {}, self.model.config.vocab_size),
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id, **sampling,
        )
        stops.flush()
        completion_tokens = output.shape[1] - prompt_tokens
        if halt.reason:
            finish = halt.reason
        elif completion_tokens >= max_new_tokens:
            finish = "length"
        else:
            finish = "stop"
        text, calls = stops.text, []
        if tools:
            prompt = self.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=False)
            text, calls = tool_calls_parse(self.tokenizer, text, prompt=prompt, tools=tools)
            if text:
                on_text(text)
            if calls and finish == "stop":
                finish = "tool_calls"
        self.touch()
        return GenerationResult(text, prompt_tokens, completion_tokens, finish, calls)


class EmbeddingEngine(LocalEngine):
    """An embedding model (admin kind "embedding", issue 15): loaded,
    arbitrated and unloaded like a chat engine (the same memory report),
    and turning texts into vectors: the last hidden states averaged over
    the real tokens (mean pooling, what e5- and most bge-style model cards
    ask for; `pooling="cls"` for those that take the first token), then
    normalised to length 1, so a dot product is the cosine.

    e5-style models expect "query: " and "passage: " before the text
    (`query_prefix`, `passage_prefix`); texts longer than the model takes
    are truncated, which the chunker avoids by counting with the same
    tokenizer (`token_count`)."""

    model_class = AutoModel

    def __init__(self, *, pooling: str = "mean", query_prefix: str = "", passage_prefix: str = "", **kwargs):
        super().__init__(**kwargs)
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be mean or cls, not {pooling!r}")
        self.pooling = pooling
        self.prefixes = {"query": query_prefix, "passage": passage_prefix}

    @property
    def dimension(self) -> int:
        return int(self.model.config.hidden_size)

    def token_count(self, text: str) -> int:
        """Tokens the model sees for `text` (no special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def embed(self, texts: list[str], *, kind: str | None = "passage", batch_size: int = 32):
        """Vectors for `texts` (a float32 numpy array, one row each, of norm 1);
        `kind`: "query" or "passage" (its prefix), or None: the texts as given
        (the embeddings API's default, chat/embeddings.py)."""
        if not self.loaded:
            raise RuntimeError(f"{self.name} is not loaded")
        self.touch()
        prefix = self.prefixes[kind] if kind else ""
        rows = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer([prefix + t for t in texts[start:start + batch_size]], padding=True,
                                   truncation=True, return_tensors="pt").to(self.model.device)
            hidden = self.model(**batch).last_hidden_state
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
            rows.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        self.touch()
        if not rows:
            return torch.empty((0, self.dimension)).numpy()
        return torch.cat(rows).numpy()


class TranslationUnsupported(CodedError):
    code = "translation_unsupported"


#: CONTRACT §9's targets, and the language codes multilingual models use.
TRANSLATION_TARGETS = {"en": "en", "zh-hans": "zh"}
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


class TranslationEngine(LocalEngine):
    """A translation model (admin kind "translation", issue 15):
    `AutoModelForSeq2SeqLM`, loaded and unloaded like a chat engine. One
    adapter for both families: a multilingual model (M2M100-style: its
    tokenizer has language codes, `get_lang_id`) is told the source
    language (from the text: Chinese if it has Han characters) and forced to
    start in the target's; a one-direction model (Marian / opus-mt) serves
    the one target it was configured with (`targets`).

    Paragraphs are translated one by one (greedy), each at most the
    model's input length: a long message is not cut at the model's limit."""

    model_class = AutoModelForSeq2SeqLM

    def __init__(self, *, targets: tuple[str, ...] = tuple(TRANSLATION_TARGETS), **kwargs):
        super().__init__(**kwargs)
        unknown = set(targets) - set(TRANSLATION_TARGETS)
        if unknown:
            raise ValueError(f"unknown translation targets {sorted(unknown)}")
        self.targets = tuple(targets)
        #: A multilingual tokenizer's source language is its state: the
        #: knowledge worker's threads translate one paragraph at a time.
        self._lock = threading.Lock()

    @property
    def multilingual(self) -> bool:
        return hasattr(self.tokenizer, "get_lang_id")

    def serves(self, target: str) -> bool:
        return target in TRANSLATION_TARGETS and (self.multilingual or target in self.targets)

    @torch.inference_mode()
    def translate(self, text: str, *, target: str) -> str:
        if not self.loaded:
            raise RuntimeError(f"{self.name} is not loaded")
        if not self.serves(target):
            raise TranslationUnsupported(f"{self.name} does not translate into {target}")
        self.touch()
        out = [self._paragraph(p, target) if p.strip() else p for p in text.split("\n")]
        self.touch()
        return "\n".join(out)

    def _paragraph(self, text: str, target: str) -> str:
        options = {}
        with self._lock:
            if self.multilingual:
                self.tokenizer.src_lang = "zh" if _HAN.search(text) else "en"
                options["forced_bos_token_id"] = self.tokenizer.get_lang_id(TRANSLATION_TARGETS[target])
            inputs = self.tokenizer(text, return_tensors="pt", truncation=True).to(self.model.device)
        # A translation is rarely more than twice its source in tokens.
        limit = min(self.tokenizer.model_max_length, 2 * inputs["input_ids"].shape[1] + 8)
        output = self.model.generate(**inputs, max_new_tokens=limit, num_beams=1, do_sample=False, **options)
        return self.tokenizer.decode(output[0], skip_special_tokens=True).strip()


#: The engine class for each kind of local model (LocalSpec.engine).
ENGINES: dict[str, type[LocalEngine]] = {"chat": LocalEngine, "embedding": EmbeddingEngine,
                                         "translation": TranslationEngine}


def engine_create(spec, *, device: str) -> LocalEngine:
    """An engine, not loaded yet, for a LocalSpec (gpu_manager/state.py)."""
    engine = ENGINES[spec.engine](name=spec.name, path=spec.path, device=device, keep_alive=spec.keep_alive,
                                  warm_offload=spec.warm_offload, **dict(spec.options))
    engine.spec_options = spec.options
    return engine


def _holders(obj) -> list[str]:
    """Describe what refers to `obj`, for the unload report: the type of each
    referrer, and for a dict the keys that point at it."""
    described = []
    for referrer in gc.get_referrers(obj):
        if isinstance(referrer, dict):
            keys = [k for k, v in referrer.items() if v is obj][:3]
            described.append(f"dict[{', '.join(map(str, keys))}]")
        elif not isinstance(referrer, types.FrameType):  # this very call
            described.append(type(referrer).__name__)
    return described[:10]


