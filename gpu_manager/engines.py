"""A local model loaded in-process with transformers: load, generate, unload.

An engine holds the only strong references to its model and tokenizer, so
that unloading can prove the memory is gone: it keeps weakrefs, drops its
references, releases memory, and reports any object that survived together
with who still refers to it.
"""
from __future__ import annotations

import gc
import logging
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList, TextStreamer

from gpu_manager.memory import memory_release

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"


class EngineLoadError(Exception):
    code = "model_load_failed"


class _TextRelay(TextStreamer):
    """Hands decoded text to `on_text` as generate() produces it, in the
    generating thread: no second thread, no queue to lose text in.
    TextStreamer holds back partial words and multi-byte characters until
    they decode cleanly."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text
        self.parts: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.parts.append(text)
            self.on_text(text)


class _StopWhen(StoppingCriteria):
    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop
        self.stopped = False

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        self.stopped = self.stopped or self.should_stop()
        return torch.full((input_ids.shape[0],), self.stopped, dtype=torch.bool, device=input_ids.device)


class LocalEngine:
    def __init__(self, *, name: str, path: str, device: str):
        self.name = name
        self.path = path
        self.device = device
        self.model = None
        self.tokenizer = None

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self) -> None:
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            # dtype "auto" keeps the checkpoint's dtype; device_map puts the
            # weights straight onto the device instead of via a cpu copy.
            self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype="auto", device_map=self.device)
        except (OSError, ValueError) as exc:
            self.model = self.tokenizer = None
            raise EngineLoadError(f"Cannot load {self.name} from {self.path}: {exc}") from exc
        self.model.eval()

    def unload(self) -> list[str]:
        """Drop the model and tokenizer and release their memory. Returns the
        names of the objects still alive afterwards (empty when all is freed)."""
        # No local variable may hold the objects themselves: a name bound
        # here (even by a walrus in a comprehension) would keep one alive.
        refs = {
            f"{self.name}.{attr}": weakref.ref(getattr(self, attr))
            for attr in ("model", "tokenizer")
            if getattr(self, attr) is not None
        }
        self.model = self.tokenizer = None
        memory_release(self.device)
        survivors = [label for label, ref in refs.items() if ref() is not None]
        for label in survivors:
            holders = [type(r).__name__ for r in gc.get_referrers(refs[label]()) if r is not refs]
            log.warning("unload of %s left %s alive, referred to by %s", self.name, label, holders[:10])
        return survivors

    @torch.inference_mode()
    def generate(
        self, messages: list[dict], *, max_new_tokens: int, temperature: float, top_p: float,
        on_text: Callable[[str], None], should_stop: Callable[[], bool],
    ) -> GenerationResult:
        if not self.loaded:
            raise RuntimeError(f"{self.name} is not loaded")
        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.model.device)
        prompt_tokens = inputs["input_ids"].shape[1]
        relay = _TextRelay(self.tokenizer, on_text)
        stop = _StopWhen(should_stop)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
            "do_sample": False}
        output = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens, streamer=relay,
            stopping_criteria=StoppingCriteriaList([stop]),
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id, **sampling,
        )
        completion_tokens = output.shape[1] - prompt_tokens
        if stop.stopped:
            finish = "cancelled"
        elif completion_tokens >= max_new_tokens:
            finish = "length"
        else:
            finish = "stop"
        return GenerationResult("".join(relay.parts), prompt_tokens, completion_tokens, finish)


