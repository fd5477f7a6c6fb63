"""The parameters of a chat completions request, and what each backend does
with them (issue 16; the table is docs/openai-api.md).

Every parameter of OpenAI's chat completions reference is either honoured,
reaching the backend that runs the request in that backend's terms, or
refused with a 400 that names it: a client that sets something and gets
something else cannot tell. Precedence: the request, then the model's
admin defaults (max_new_tokens, temperature, top_p), then the backend's.

- local models: `generate()` arguments (gpu_manager/generation.py);
- Ollama: `options` (num_predict, temperature, top_p, stop, seed, the
  penalties), `tools`, `format`, `images`;
- OpenAI-compatible upstreams: the request's parameters, passed through.

`options_parse` checks what a request says whatever its model; `options_check`
refuses what the resolved model's backend cannot do. The checked options are
stored on the reply (`Message.params`), and the worker maps them when it runs
(`local_arguments`, `ollama_arguments`, `openai_arguments`).
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import secrets

from chatsite.errors import CodedError

#: Handled by chat/completions.py itself, not options of the generation.
REQUEST_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "knowledge", "n"})

#: The generation's own options, every backend: checked here, mapped per backend.
SAMPLING = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
            "presence_penalty", "frequency_penalty")
#: Options no backend here needs to act on: a caller's labels, kept with
#: the reply (`Message.params`) and passed on to an upstream.
LABELS = ("user", "safety_identifier", "metadata", "prompt_cache_key")
#: Only an OpenAI-compatible upstream can do these (passed through); local
#: models and Ollama refuse them, but for the values that ask for nothing
#: (`QUIET_VALUES`).
UPSTREAM_ONLY = ("logprobs", "top_logprobs", "audio", "modalities", "prediction", "reasoning_effort",
                 "service_tier", "store", "verbosity", "web_search_options", "functions", "function_call",
                 "prompt_cache_options", "prompt_cache_retention", "moderation")
#: Values of upstream-only options that ask a backend for nothing it does not do already.
QUIET_VALUES = {"logprobs": (False, None), "modalities": (["text"], None), "service_tier": ("auto", "default", None),
                "store": (False, None)}
TOOLS = ("tools", "tool_choice", "parallel_tool_calls")
KNOWN = frozenset((*SAMPLING, *LABELS, *UPSTREAM_ONLY, *TOOLS, "logit_bias", "response_format"))

#: OpenAI's limits (the reference, "Create chat completion"): 4 stop
#: sequences, 300 logit_bias entries, 128 tools; n up to MAX_CHOICES here
#: (each choice is a reply of its own: chat/completions.py).
MAX_STOP = 4
MAX_LOGIT_BIAS = 300
MAX_TOOLS = 128
MAX_CHOICES = 8

_DATA_URL = re.compile(r"data:image/[a-z0-9.+-]+;base64,(?P<data>.*)", re.S | re.I)


class ParamError(CodedError):
    """A parameter a request may not have, as given: `param` names it
    (chat/completions.py makes it OpenAI's 400)."""

    code = "invalid_request"

    def __init__(self, detail: str, *, param: str):
        super().__init__(detail)
        self.param = param


def _bad(param: str, detail: str) -> ParamError:
    return ParamError(detail, param=param)


def _number(body: dict, name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _bad(name, f"'{name}' must be a number from {low:g} to {high:g}.")


def _integer(body: dict, name: str, low: int, high: int | None = None) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise _bad(name, f"'{name}' must be an integer {bound}.")


def options_parse(body: dict) -> dict:
    """The request's generation options, checked for every backend alike:
    names, types and ranges as OpenAI's reference gives them. An unknown
    name is refused as OpenAI refuses it."""
    for name in body:
        if name not in KNOWN and name not in REQUEST_FIELDS:
            raise _bad(name, f"Unrecognized request argument supplied: {name}")
    options = {name: body[name] for name in body if name in KNOWN and body[name] is not None}
    _integer(options, "max_tokens", 1)
    _integer(options, "max_completion_tokens", 1)
    _number(options, "temperature", 0, 2)
    _number(options, "top_p", 0, 1)
    _number(options, "presence_penalty", -2, 2)
    _number(options, "frequency_penalty", -2, 2)
    _integer(options, "seed", -2**63, 2**63 - 1)
    _integer(options, "top_logprobs", 0, 20)
    stop = options.get("stop")
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                               or not all(isinstance(s, str) and s for s in stop)):
        raise _bad("stop", f"'stop' must be a string or a list of up to {MAX_STOP} non-empty strings.")
    if "logit_bias" in options:
        options["logit_bias"] = _logit_bias(options["logit_bias"])
    if "tools" in options:
        _tools(options["tools"])
    if "tool_choice" in options:
        _tool_choice(options["tool_choice"], options.get("tools") or [])
    if "parallel_tool_calls" in options and not isinstance(options["parallel_tool_calls"], bool):
        raise _bad("parallel_tool_calls", "'parallel_tool_calls' must be a boolean.")
    if "response_format" in options:
        _response_format(options["response_format"])
    if "metadata" in options and not (isinstance(options["metadata"], dict) and len(options["metadata"]) <= 16
                                      and all(isinstance(v, str) for v in options["metadata"].values())):
        raise _bad("metadata", "'metadata' must be an object of up to 16 string values.")
    for name in ("user", "safety_identifier", "prompt_cache_key"):
        if name in options and not isinstance(options[name], str):
            raise _bad(name, f"'{name}' must be a string.")
    return options


def choices_count(body: dict) -> int:
    _integer(body, "n", 1, MAX_CHOICES)
    return body.get("n") or 1


def _logit_bias(value) -> dict:
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise _bad("logit_bias", f"'logit_bias' must be an object of up to {MAX_LOGIT_BIAS} token ids.")
    checked = {}
    for token, bias in value.items():
        if not str(token).isdigit():
            raise _bad("logit_bias", f"logit_bias: {token!r} is not a token id.")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise _bad("logit_bias", f"logit_bias[{token}] must be a number from -100 to 100.")
        checked[str(int(token))] = bias
    return checked


def _tools(tools) -> None:
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise _bad("tools", f"'tools' must be a list of up to {MAX_TOOLS} tools.")
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise _bad(f"tools[{index}]", f"tools[{index}] must be {{'type': 'function', 'function': {{'name': ...}}}}.")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise _bad(f"tools[{index}].function.parameters", "A tool's parameters must be a JSON schema object.")


def _tool_choice(choice, tools: list) -> None:
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise _bad("tool_choice", "tool_choice 'required' needs tools.")
        return
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise _bad("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or "
                                  "{'type': 'function', 'function': {'name': ...}}.")
    if name not in {t["function"]["name"] for t in tools}:
        raise _bad("tool_choice", f"tool_choice names {name!r}, which is not among the tools.")


def _response_format(value) -> None:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise _bad("response_format", "response_format.type must be 'text', 'json_object' or 'json_schema'.")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or \
                not isinstance(spec.get("schema", {}), dict):
            raise _bad("response_format", "response_format.json_schema needs a name and a schema object.")


# --- What each backend refuses ----------------------------------------------

def options_check(options: dict, *, kind: str, messages: list[dict] | None, tools_template: bool = True) -> None:
    """Refuse, naming it, what the resolved model's backend cannot honour.
    `kind`: the model's (local, ollama, openai). `messages`: the request's
    messages when they carry more than text (images, tool calls).
    `tools_template`: a local model's chat template takes tools."""
    if kind == "openai":
        return  # everything passes through: the upstream answers for itself
    where = "local models" if kind == "local" else "Ollama models"
    for name in UPSTREAM_ONLY:
        if name in options and options[name] not in QUIET_VALUES.get(name, ()):
            raise _bad(name, f"'{name}' is not supported for {where}; only OpenAI-compatible endpoints take it.")
    if kind == "ollama" and "logit_bias" in options:
        raise _bad("logit_bias", "'logit_bias' is not supported for Ollama models: Ollama has no such option.")
    choice = options.get("tool_choice")
    if options.get("tools") and choice not in (None, "auto", "none"):
        raise _bad("tool_choice", f"tool_choice {json.dumps(choice)} is not supported for {where}: the model "
                                  "decides whether to call a tool ('auto') or is given none ('none').")
    if options.get("parallel_tool_calls") is False and options.get("tools"):
        raise _bad("parallel_tool_calls", f"parallel_tool_calls false is not supported for {where}.")
    images = any(part.get("type") == "image_url" for m in messages or () if isinstance(m.get("content"), list)
                 for part in m["content"])
    if kind == "local":
        if options.get("tools") and not tools_template:
            raise _bad("tools", "This model's chat template does not take tools.")
        if (options.get("response_format") or {}).get("type", "text") != "text":
            raise _bad("response_format", "response_format is not supported for local models: they have no "
                                          "constrained decoding here.")
        if images:
            raise _bad("messages", "Local models here take text only; send images to an Ollama vision model "
                                   "or an OpenAI-compatible endpoint.")
    if kind == "ollama" and images:
        for m in messages:
            for part in m["content"] if isinstance(m.get("content"), list) else ():
                if part.get("type") == "image_url" and not _DATA_URL.fullmatch(part["image_url"]["url"]):
                    raise _bad("messages", "Ollama takes images as data: URLs (data:image/...;base64,...); "
                                           "this service does not fetch image URLs for it.")


# --- Per backend ------------------------------------------------------------

def max_tokens(options: dict, generation: dict) -> int:
    return options.get("max_completion_tokens") or options.get("max_tokens") or generation["max_new_tokens"]


def local_arguments(options: dict, generation: dict) -> dict:
    """Keyword arguments of gpu_manager's `LocalEngine.generate`."""
    tools = options.get("tools") if options.get("tool_choice") != "none" else None
    return {
        "max_new_tokens": max_tokens(options, generation),
        "temperature": options.get("temperature", generation["temperature"]),
        "top_p": options.get("top_p", generation["top_p"]),
        "stop": options.get("stop") or (),
        "seed": options.get("seed"),
        "presence_penalty": options.get("presence_penalty", 0.0),
        "frequency_penalty": options.get("frequency_penalty", 0.0),
        "logit_bias": {int(k): float(v) for k, v in (options.get("logit_bias") or {}).items()},
        "tools": tools or None,
    }


#: OpenAI's name -> Ollama's option (docs/api.md "Generate request (with options)").
_OLLAMA_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "stop": "stop", "seed": "seed",
                   "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}


def ollama_arguments(options: dict, generation: dict) -> dict:
    """Keyword arguments of chatsite/ollama_client's `ollama_chat_stream`
    (but messages): `options`, and `tools` and `format` when asked for."""
    mapped = {"num_predict": max_tokens(options, generation), "temperature": generation["temperature"],
              "top_p": generation["top_p"]}
    mapped.update({theirs: options[ours] for ours, theirs in _OLLAMA_OPTIONS.items() if ours in options})
    arguments = {"options": mapped}
    if options.get("tools") and options.get("tool_choice") != "none":
        arguments["tools"] = options["tools"]
    response_format = options.get("response_format") or {}
    if response_format.get("type") == "json_object":
        arguments["format"] = "json"
    elif response_format.get("type") == "json_schema":
        arguments["format"] = response_format["json_schema"].get("schema", {})
    return arguments


def openai_arguments(options: dict, generation: dict) -> dict:
    """The upstream request's parameters (but model, messages and stream):
    the request's own, and the admin defaults for what it left out."""
    passed = dict(options)
    if "max_tokens" not in passed and "max_completion_tokens" not in passed:
        passed["max_tokens"] = generation["max_new_tokens"]
    passed.setdefault("temperature", generation["temperature"])
    passed.setdefault("top_p", generation["top_p"])
    return passed


# --- Messages ---------------------------------------------------------------

def ollama_messages(messages: list[dict]) -> list[dict]:
    """OpenAI's messages in Ollama's terms: text content, images as raw
    bytes, tool calls with their arguments as objects, tool results with
    their tool's name."""
    names = _tool_names(messages)
    converted = []
    for m in messages:
        turn = {"role": m["role"], "content": text_of(m.get("content"))}
        images = [image_bytes(p) for p in m["content"] if p.get("type") == "image_url"] \
            if isinstance(m.get("content"), list) else []
        if images:
            # Bytes, never a str: the ollama client reads a str that names an
            # existing file from disk (ollama._types.Image), which a caller's
            # "base64" must never be able to make it do.
            turn["images"] = images
        if m.get("tool_calls"):
            turn["tool_calls"] = [{"function": _call_function(c)} for c in m["tool_calls"]]
        if m["role"] == "tool" and names.get(m.get("tool_call_id")):
            turn["tool_name"] = names[m["tool_call_id"]]
        converted.append(turn)
    return converted


def local_messages(messages: list[dict]) -> list[dict]:
    """OpenAI's messages as transformers' chat templates take them: tool
    calls with their arguments as objects, tool results with their tool's name."""
    names = _tool_names(messages)
    converted = []
    for m in messages:
        turn = {"role": m["role"], "content": text_of(m.get("content"))}
        if m.get("tool_calls"):
            turn["tool_calls"] = [{"type": "function", "function": _call_function(c)} for c in m["tool_calls"]]
        if m["role"] == "tool":
            turn["name"] = names.get(m.get("tool_call_id"), "")
        converted.append(turn)
    return converted


def _tool_names(messages: list[dict]) -> dict:
    """The tool each call id names: a result is sent back under it (OpenAI
    names only the call's id)."""
    return {c.get("id"): c["function"]["name"] for m in messages for c in m.get("tool_calls") or ()}


def _call_function(call: dict) -> dict:
    """A call's function with its arguments as an object, as Ollama and
    chat templates take it (OpenAI sends a JSON string)."""
    return {"name": call["function"]["name"], "arguments": arguments_object(call["function"].get("arguments"))}


def text_of(content) -> str:
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    return content or ""


def image_bytes(part: dict) -> bytes:
    match = _DATA_URL.fullmatch(part["image_url"]["url"])
    try:
        return base64.b64decode(match.group("data"), validate=True)
    except (binascii.Error, AttributeError) as exc:
        raise ParamError("An image is not valid base64 data.", param="messages") from exc


def arguments_object(arguments) -> dict:
    """A tool call's arguments as an object (OpenAI sends a JSON string)."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def tool_call(name: str, arguments) -> dict:
    """One tool call in OpenAI's form (arguments as a JSON string)."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function", "function": {"name": name, "arguments": text}}
