"""The request parameters that shape a fake's answer, through the official
clients: token limits and stop strings, tool calls, structured output,
images, several choices, and embeddings.  Plain pytest, no Django.

``tests/test_fakes.py`` covers the rest of the fakes (lifecycle, residency,
failures, recording).
"""
import base64
import json
import math
import struct

import httpx
import ollama
import openai
import pytest

from tests.fakes import FakeOllama, FakeOpenAI

CHAT, EMBED = "qwen:7b", "nomic-embed-text"
GPT, OAI_EMBED, ADA = "gpt-4o-mini", "text-embedding-3-small", "text-embedding-ada-002"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"}, "alerts": {"type": "boolean"}, "hours": {"type": "array"},
        "where": {"type": "object"}, "note": {"type": "string"}},
        "required": ["city", "unit", "days", "alerts", "hours", "where"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string"}}, "required": ["zone"]}}}
WEATHER_ARGS = {"city": "Paris", "unit": "celsius", "days": 1, "alerts": True, "hours": [],
                "where": {}}
SCHEMA = {"type": "object", "properties": {"age": {"type": "integer"},
                                           "available": {"type": "boolean"}},
          "required": ["age", "available"]}
PNG = b"\x89PNG\r\n\x1a\nfake"


@pytest.fixture
def fake_ollama():
    with FakeOllama(models=(CHAT, EMBED)) as fake:
        yield fake


@pytest.fixture
def fake_openai():
    with FakeOpenAI(models=(GPT, OAI_EMBED, ADA)) as fake:
        yield fake


def ochat(fake, stream, **kw):
    """One /api/chat through the ollama client: (text, tool calls, last chunk)."""
    kw.setdefault("messages", USER)
    parts = list(ollama.Client(host=fake.url).chat(model=CHAT, stream=True, **kw)) if stream \
        else [ollama.Client(host=fake.url).chat(model=CHAT, stream=False, **kw)]
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    calls = [c for p in parts for c in p.message.tool_calls or []]
    return "".join(p.message.content for p in parts), calls, parts[-1]


def aclient(fake):
    return openai.OpenAI(base_url=fake.url + "/v1", api_key=fake.api_key, max_retries=0)


def achat(fake, stream, **kw):
    """One chat completion through the openai client, as a non-streamed one
    looks: [(text, tool calls as dicts, finish_reason) per choice]."""
    kw.setdefault("messages", USER)
    kw.setdefault("model", GPT)
    if not stream:
        resp = aclient(fake).chat.completions.create(**kw)
        assert [c.index for c in resp.choices] == list(range(len(resp.choices)))
        return [(c.message.content, [t.model_dump() for t in c.message.tool_calls or []],
                 c.finish_reason) for c in resp.choices]
    choices: dict[int, list] = {}
    for chunk in aclient(fake).chat.completions.create(stream=True, **kw):
        (c,) = chunk.choices  # one choice per chunk, whatever n is
        text, calls, _ = choices.setdefault(c.index, ["", [], None])
        choices[c.index][0] = text + (c.delta.content or "")
        for delta in c.delta.tool_calls or []:
            if delta.id:  # a call's first delta: id, type and name, arguments ""
                assert delta.function.arguments == "" and delta.type == "function"
                calls.append({"id": delta.id, "type": "function", "function": {
                    "name": delta.function.name, "arguments": ""}})
            else:  # then only the index and a fragment
                assert delta.type is None and delta.function.name is None
                calls[delta.index]["function"]["arguments"] += delta.function.arguments
        if c.finish_reason:
            choices[c.index][2] = c.finish_reason
    return [(text or None if calls else text, calls, reason)
            for text, calls, reason in (choices[i] for i in sorted(choices))]


def norm(vector) -> float:
    return math.sqrt(sum(v * v for v in vector))


# -- Ollama /api/chat ------------------------------------------------------------
@pytest.mark.parametrize("stream", [True, False])
def test_ollama_num_predict_and_stop(fake_ollama, stream):
    text, _, last = ochat(fake_ollama, stream, options={"num_predict": 2})
    assert (text, last.done_reason, last.eval_count) == ("Hello from", "length", 2)
    text, _, last = ochat(fake_ollama, stream, options={"stop": ["zzz", "fake"]})
    assert (text, last.done_reason) == ("Hello from ", "stop")
    text, _, last = ochat(fake_ollama, stream, options={"stop": ["fake"], "num_predict": 1})
    assert (text, last.done_reason) == ("Hello", "length")  # the limit came first
    text, _, last = ochat(fake_ollama, stream, options={"num_predict": -1, "seed": 7})
    assert (text, last.done_reason) == (fake_ollama.reply, "stop")
    options = {"seed": 42, "temperature": 0.2, "top_p": 0.9, "presence_penalty": 0.5,
               "frequency_penalty": 0.1}
    ochat(fake_ollama, stream, options=options)
    assert fake_ollama.requests_to("/api/chat")[-1].body["options"] == options


@pytest.mark.parametrize("stream", [True, False])
def test_ollama_tool_call(fake_ollama, stream):
    text, calls, last = ochat(fake_ollama, stream, tools=[WEATHER, TIME])
    assert text == "" and last.done_reason == "stop"
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather",
                                                                       WEATHER_ARGS)]
    # The client drops what newer Ollama adds to a call; the wire has it.
    raw = httpx.post(fake_ollama.url + "/api/chat", json={
        "model": CHAT, "messages": USER, "tools": [TIME], "stream": stream}).text
    lines = [json.loads(line) for line in raw.splitlines()]
    (call,) = lines[0]["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["function"] == {
        "index": 0, "name": "get_time", "arguments": {"zone": "Paris"}}
    if stream:  # the calls come in a line of their own, before the final one
        assert len(lines) == 2 and not lines[0]["done"] and "tool_calls" not in lines[1]["message"]


@pytest.mark.parametrize("stream", [True, False])
def test_ollama_answers_a_tool_result(fake_ollama, stream):
    _, calls, _ = ochat(fake_ollama, False, tools=[WEATHER])
    history = USER + [{"role": "assistant", "content": "", "tool_calls": calls}]
    for result in ({"role": "tool", "content": "11 degrees", "tool_name": "get_weather"},
                   {"role": "tool", "content": "11 degrees"}):
        text, calls, last = ochat(fake_ollama, stream, tools=[WEATHER],
                                  messages=history + [result])
        assert (text, calls, last.done_reason) == ("The tool said: 11 degrees", [], "stop")


@pytest.mark.parametrize("stream", [True, False])
def test_ollama_format(fake_ollama, stream):
    text, _, _ = ochat(fake_ollama, stream, format="json")
    assert json.loads(text) == {"answer": fake_ollama.reply}
    text, _, _ = ochat(fake_ollama, stream, format=SCHEMA)
    assert json.loads(text) == {"age": 1, "available": True}


@pytest.mark.parametrize("stream", [True, False])
def test_ollama_images(fake_ollama, stream):
    messages = [{"role": "user", "content": "What is this?", "images": [PNG]},
                {"role": "assistant", "content": "A picture."},
                {"role": "user", "content": "And these?", "images": [PNG, PNG]}]
    text, _, _ = ochat(fake_ollama, stream, messages=messages)
    assert text == "I see 3 images. " + fake_ollama.reply
    text, _, _ = ochat(fake_ollama, stream, messages=messages[:1])
    assert text.startswith("I see 1 image. ")
    bad = httpx.post(fake_ollama.url + "/api/chat", json={"model": CHAT, "stream": stream,
                     "messages": [{"role": "user", "content": "x", "images": ["no!"]}]})
    assert bad.status_code == 400 and bad.json() == {"error": "illegal base64 data at input byte 2"}


# -- Ollama /api/embed -------------------------------------------------------------
def test_ollama_embed(fake_ollama):
    client = ollama.Client(host=fake_ollama.url)
    assert EMBED + ":latest" in [m.model for m in client.list().models]
    resp = client.embed(model=EMBED, input=["sky", "grass", "sky"], options={"num_gpu": 0})
    a, b, again = resp.embeddings
    assert len(a) == 8 and a == again and a != b
    assert all(abs(norm(v) - 1) < 1e-6 for v in (a, b))
    assert resp.model == EMBED and resp.prompt_eval_count == 3 and resp.total_duration > 0
    assert resp.load_duration > 0
    assert fake_ollama.requests_to("/api/embed")[-1].body["options"] == {"num_gpu": 0}
    assert [(m.model, m.size_vram) for m in client.ps().models] == [
        (EMBED + ":latest", fake_ollama.size_vram)]
    short = client.embed(model=EMBED, input="sky", dimensions=4).embeddings[0]
    assert abs(norm(short) - 1) < 1e-6  # a's first 4 components, renormalised
    assert all(abs(s - x / norm(a[:4])) < 1e-6 for s, x in zip(short, a))
    assert len(client.embed(model=EMBED, input="sky", dimensions=16).embeddings[0]) == 16


def test_ollama_embed_loads_and_refuses_as_ollama_does(fake_ollama):
    client = ollama.Client(host=fake_ollama.url)
    assert client.embed(model=EMBED, input=[]).embeddings == []  # a load
    assert [m.model for m in client.ps().models] == [EMBED + ":latest"]
    client.embed(model=EMBED, input="sky", keep_alive=0)
    assert client.ps().models == []
    with pytest.raises(ollama.ResponseError) as err:  # loaded first, then refused by the runner
        client.embed(model=CHAT, input="sky")
    assert (err.value.status_code, err.value.error) == (501, "this model does not support embeddings")
    assert [m.model for m in client.ps().models] == [CHAT]
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="nope:1b", input="sky")
    assert (err.value.status_code, err.value.error) == (404, "model 'nope:1b' not found")
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model=EMBED, messages=USER)
    assert (err.value.status_code, err.value.error) == (400, '"nomic-embed-text" does not support chat')
    assert client.generate(model=EMBED, keep_alive=0).done_reason == "unload"


# -- OpenAI chat completions --------------------------------------------------------
@pytest.mark.parametrize("stream", [True, False])
def test_openai_stop_and_limits(fake_openai, stream):
    assert achat(fake_openai, stream, stop="fake") == [("Hello from ", [], "stop")]
    assert achat(fake_openai, stream, stop=["zzz", "from"]) == [("Hello ", [], "stop")]
    assert achat(fake_openai, stream, stop=["fake"], max_tokens=1) == [("Hello", [], "length")]
    assert achat(fake_openai, stream, max_completion_tokens=2) == [("Hello from", [], "length")]


@pytest.mark.parametrize("stream", [True, False])
def test_openai_n_choices(fake_openai, stream):
    assert achat(fake_openai, stream, n=3) == [(fake_openai.reply, [], "stop")] * 3
    resp = aclient(fake_openai).chat.completions.create(model=GPT, messages=USER, n=2)
    assert resp.usage.completion_tokens == 8


@pytest.mark.parametrize("stream", [True, False])
def test_openai_tool_call(fake_openai, stream):
    (choice,) = achat(fake_openai, stream, tools=[WEATHER, TIME])
    content, (call,), reason = choice
    assert content is None and reason == "tool_calls"
    assert call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == WEATHER_ARGS
    (choice,) = achat(fake_openai, stream, tools=[WEATHER, TIME], tool_choice={
        "type": "function", "function": {"name": "get_time"}})
    assert [c["function"] for c in choice[1]] == [{"name": "get_time",
                                                    "arguments": '{"zone": "Paris"}'}]
    assert achat(fake_openai, stream, tools=[WEATHER], tool_choice="none") == [
        (fake_openai.reply, [], "stop")]
    two = achat(fake_openai, stream, tools=[TIME], n=2)
    assert [reason for _, _, reason in two] == ["tool_calls"] * 2
    assert two[0][1][0]["id"] != two[1][1][0]["id"]


def test_openai_streams_tool_arguments_in_fragments(fake_openai):
    chunks = list(aclient(fake_openai).chat.completions.create(
        model=GPT, messages=USER, tools=[WEATHER], stream=True))
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].index == 0 and deltas[0].function.arguments == ""
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(deltas) == 4 and {d.index for d in deltas} == {0}


@pytest.mark.parametrize("stream", [True, False])
def test_openai_answers_a_tool_result(fake_openai, stream):
    (_, calls, _), = achat(fake_openai, False, tools=[WEATHER])
    history = USER + [{"role": "assistant", "content": None, "tool_calls": calls},
                      {"role": "tool", "tool_call_id": calls[0]["id"], "content": "11 degrees"}]
    assert achat(fake_openai, stream, tools=[WEATHER], messages=history) == [
        ("The tool said: 11 degrees", [], "stop")]


@pytest.mark.parametrize("stream", [True, False])
def test_openai_response_format(fake_openai, stream):
    (text, _, _), = achat(fake_openai, stream, response_format={"type": "json_object"})
    assert json.loads(text) == {"answer": fake_openai.reply}
    (text, _, _), = achat(fake_openai, stream, response_format={"type": "json_schema",
                          "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}})
    assert json.loads(text) == {"age": 1, "available": True}


@pytest.mark.parametrize("stream", [True, False])
def test_openai_image_parts(fake_openai, stream):
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": url}}]}]
    assert achat(fake_openai, stream, messages=messages) == [
        ("I see 1 image. " + fake_openai.reply, [], "stop")]


def test_openai_unknown_parameters_are_recorded(fake_openai):
    aclient(fake_openai).chat.completions.create(
        model=GPT, messages=USER, seed=3, extra_body={"top_k": 5})
    body = fake_openai.requests_to("/v1/chat/completions")[-1].body
    assert body["seed"] == 3 and body["top_k"] == 5


# -- OpenAI embeddings ----------------------------------------------------------------
def test_openai_embeddings(fake_openai):
    client = aclient(fake_openai)
    resp = client.embeddings.create(model=OAI_EMBED, input=["sky", "green grass"])
    assert fake_openai.requests_to("/v1/embeddings")[-1].body["encoding_format"] == "base64"
    assert [d.index for d in resp.data] == [0, 1] and resp.model == OAI_EMBED
    a, b = (d.embedding for d in resp.data)
    assert len(a) == 8 and a != b and abs(norm(a) - 1) < 1e-6
    assert (resp.usage.prompt_tokens, resp.usage.total_tokens) == (3, 3)
    floats = client.embeddings.create(model=OAI_EMBED, input="sky", encoding_format="float")
    assert floats.data[0].embedding == a  # float32 both ways
    raw = httpx.post(fake_openai.url + "/v1/embeddings", json={
        "model": OAI_EMBED, "input": "sky", "encoding_format": "base64"},
        headers={"Authorization": "Bearer sk-test"}).json()
    assert list(struct.unpack("<8f", base64.b64decode(raw["data"][0]["embedding"]))) == a
    short = client.embeddings.create(model=OAI_EMBED, input="sky", dimensions=3).data[0].embedding
    assert len(short) == 3 and abs(norm(short) - 1) < 1e-6
    tokens = client.embeddings.create(model=OAI_EMBED, input=[[1, 2, 3], [4]])
    assert len(tokens.data) == 2 and tokens.usage.prompt_tokens == 4
    assert len(client.embeddings.create(model=OAI_EMBED, input=[5, 6]).data) == 1


def test_openai_embeddings_refusals(fake_openai):
    client = aclient(fake_openai)
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.embeddings.create(model=GPT, input="sky")
    assert err.value.body["message"] == "You are not allowed to generate embeddings from this model"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=ADA, input="sky", dimensions=4)
    assert len(client.embeddings.create(model=ADA, input="sky").data[0].embedding) == 8
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=OAI_EMBED, input="")
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="text-embedding-9", input="sky")
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model=OAI_EMBED, messages=USER)
    assert "not a chat model" in err.value.message
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=fake_openai.url + "/v1", api_key="sk-wrong",
                      max_retries=0).embeddings.create(model=OAI_EMBED, input="sky")
