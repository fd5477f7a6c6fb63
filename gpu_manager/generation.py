"""What a local generation does with a request's options beyond sampling
(issue 16; chat/params.py maps OpenAI's names to these): stop sequences,
OpenAI's presence and frequency penalties, and tool calls read back from
the model's text.

transformers has `stop_strings`, but it stops *after* the stop string, which
has been streamed by then; OpenAI's stop sequence is never part of the
reply. `StopText` sits between the decoder and the relay instead and holds
back only the text that could still become a stop sequence.
"""
from __future__ import annotations

import json
import re
from typing import Callable

import torch
from transformers import LogitsProcessor

from chatsite.errors import CodedError


class GenerationRefused(CodedError):
    """A request this model cannot do as asked (a 400 at the API)."""

    code = "invalid_request"


class StopText:
    """Passes text on to `on_text`, but ends the reply before the first stop
    sequence: what might be the start of one is held back until it is known
    not to be. `hit`: a stop sequence was seen (the generation stops at the
    next token, `_StopWhen`)."""

    def __init__(self, stops: list[str] | tuple[str, ...], on_text: Callable[[str], None]):
        self.stops = [s for s in stops if s]
        self.on_text = on_text
        self.held = ""
        self.sent: list[str] = []
        self.hit = False

    def push(self, text: str) -> None:
        if self.hit:
            return
        self.held += text
        cut = min((i for i in (self.held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            self._send(self.held[:cut])
            self.held = ""
            return
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        self._send(self.held[:len(self.held) - keep])
        self.held = self.held[len(self.held) - keep:]

    def flush(self) -> None:
        """The reply ended without a stop sequence: what was held is text."""
        if not self.hit:
            self._send(self.held)
        self.held = ""

    def _send(self, text: str) -> None:
        if text:
            self.sent.append(text)
            self.on_text(text)

    @property
    def text(self) -> str:
        return "".join(self.sent)


class Penalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties, over the tokens generated
    so far (not the prompt's): logit[j] -= count[j] * frequency +
    (count[j] > 0) * presence (platform.openai.com, "Parameter details").
    transformers' repetition_penalty is another rule (it divides the logit,
    and counts the prompt), so it is not used for them."""

    def __init__(self, *, prompt_tokens: int, presence: float, frequency: float):
        self.prompt_tokens = prompt_tokens
        self.presence = presence
        self.frequency = frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_tokens:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


def sequence_bias(logit_bias: dict[int, float], vocab_size: int) -> dict[tuple[int], float] | None:
    """OpenAI's logit_bias (token id -> bias added to its logit) as
    generate()'s `sequence_bias`; ids are this model's own tokenizer's."""
    if not logit_bias:
        return None
    beyond = [token for token in logit_bias if token >= vocab_size]
    if beyond:
        raise GenerationRefused(f"logit_bias names token {beyond[0]}, beyond this model's vocabulary "
                                f"({vocab_size} tokens).")
    return {(token,): bias for token, bias in logit_bias.items()}


def template_takes_tools(tokenizer) -> bool:
    """Whether the model's chat template renders `tools` at all: a template
    that never reads the variable would drop them without a word."""
    template = tokenizer.chat_template
    sources = template.values() if isinstance(template, dict) else [template or ""]
    return any(re.search(r"\btools\b", source) for source in sources)


#: The convention of Hermes-style templates (Qwen2.5, Hermes, many
#: fine-tunes) when the tokenizer brings no response parser of its own.
_HERMES_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def tool_calls_parse(tokenizer, text: str, *, prompt: str, tools: list[dict]) -> tuple[str, list[dict]]:
    """The reply's text without its tool calls, and the calls as
    (name, arguments) dicts. The tokenizer's own parser first
    (`response_template`, transformers' `parse_response`), else the
    Hermes `<tool_call>{"name": ..., "arguments": ...}</tool_call>` form."""
    if getattr(tokenizer, "response_template", None):
        parsed = tokenizer.parse_response(text, prefix=prompt, tools=tools)
        calls = [c.get("function", c) for c in parsed.get("tool_calls") or []]
        return parsed.get("content") or "", [{"name": c["name"], "arguments": c.get("arguments", {})}
                                             for c in calls if c.get("name")]
    calls = []
    for match in _HERMES_CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            calls.append({"name": call["name"], "arguments": call.get("arguments") or {}})
    return (_HERMES_CALL.sub("", text).strip() if calls else text), calls
