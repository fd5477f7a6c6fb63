"""Issue 16: every chat completions parameter is honoured by the backend
that runs the request, in that backend's terms, or refused with a 400 that
names it. The official `openai` client against the real stack (web
process, Celery workers, Redis) and the fake Ollama and OpenAI servers,
which record what reached them: Ollama's `options`, `tools`, `format` and
`images`, and the upstream's request body."""
import base64
import json
import shutil

import httpx
import openai
import pytest

from chat.catalog import catalog_forget
from chat.models import Message, ModelConfig, ModelKind
from tests.support.waiting import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

OLLAMA, UPSTREAM, LOCAL = "ollama_qwen:7b", "openai_gpt-4o-mini", "local_demo"
HI = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PIXEL = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()


def ollama_sent(stack) -> dict:
    return stack.ollama.requests_to("/api/chat")[-1].body


def upstream_sent(stack) -> dict:
    return stack.openai.requests_to("/v1/chat/completions")[-1].body


def complete(api, stream: bool, **request):
    """A completion, streamed or not, as (text, finish_reason, tool_calls, usage)
    of each choice: what a client reads either way."""
    if not stream:
        completion = api.chat.completions.create(**request)
        return [(c.message.content, c.finish_reason, c.message.tool_calls, completion.usage)
                for c in completion.choices]
    chunks = list(api.chat.completions.create(stream=True, stream_options={"include_usage": True}, **request))
    usage = chunks[-1].usage
    choices: dict[int, list] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            text, finish, calls = choices.setdefault(choice.index, ["", None, []])
            choices[choice.index][0] = text + (choice.delta.content or "")
            choices[choice.index][1] = choice.finish_reason or finish
            calls += choice.delta.tool_calls or []
    return [(text, finish, calls or None, usage) for _, (text, finish, calls) in sorted(choices.items())]


# --- sampling: what each backend receives -----------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_cuts_a_local_reply_with_finish_reason_length(api, demo_model, workers, stream):
    [(text, finish, _, usage)] = complete(api, stream, model=LOCAL, messages=HI, max_tokens=3)
    assert usage.completion_tokens == 3 and finish == "length"  # the admin's default is 256
    [(_, finish, _, usage)] = complete(api, stream, model=LOCAL, messages=HI, max_completion_tokens=2)
    assert usage.completion_tokens == 2 and finish == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_receives_every_sampling_option_in_its_own_terms(api, demo_model, workers, stack, stream):
    [(text, finish, _, _)] = complete(api, stream, model=OLLAMA, messages=HI, max_tokens=3, temperature=0.2,
                                      top_p=0.5, seed=7, stop=["zz"], presence_penalty=0.5,
                                      frequency_penalty=-0.5)
    assert ollama_sent(stack)["options"] == {"num_predict": 3, "temperature": 0.2, "top_p": 0.5, "seed": 7,
                                             "stop": ["zz"], "presence_penalty": 0.5, "frequency_penalty": -0.5}
    assert finish == "length"  # Ollama's done_reason, as it said it
    complete(api, stream, model=OLLAMA, messages=HI, max_completion_tokens=4)
    assert ollama_sent(stack)["options"]["num_predict"] == 4


def test_without_options_ollama_gets_the_models_defaults(api, demo_model, workers, stack):
    api.chat.completions.create(model=OLLAMA, messages=HI)
    options = ollama_sent(stack)["options"]
    assert options["num_predict"] > 3 and set(options) == {"num_predict", "temperature", "top_p"}


def test_a_stop_sequence_ends_the_ollama_reply_before_it(api, demo_model, workers, stack):
    stack.ollama.reply = "one two three four"
    [(text, finish, _, _)] = complete(api, False, model=OLLAMA, messages=HI, stop="three")
    assert text.strip() == "one two" and finish == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_receives_the_request_as_sent(api, demo_model, workers, stack, stream):
    complete(api, stream, model=UPSTREAM, messages=HI, max_completion_tokens=5, temperature=0.1, seed=3,
             stop=["\n\n"], presence_penalty=1.0, logit_bias={"50256": -100}, user="u-1",
             metadata={"team": "a"}, reasoning_effort="low")
    body = upstream_sent(stack)
    assert body["model"] == "gpt-4o-mini" and body["messages"] == HI
    assert {k: body[k] for k in ("max_completion_tokens", "temperature", "seed", "stop", "presence_penalty",
                                 "logit_bias", "user", "metadata", "reasoning_effort")} == {
        "max_completion_tokens": 5, "temperature": 0.1, "seed": 3, "stop": ["\n\n"], "presence_penalty": 1.0,
        "logit_bias": {"50256": -100}, "user": "u-1", "metadata": {"team": "a"}, "reasoning_effort": "low"}
    assert "max_tokens" not in body  # the alias the client chose is the one passed on


def test_an_upstream_gets_the_admin_defaults_for_what_the_request_leaves_out(api, demo_model, workers, stack):
    api.chat.completions.create(model=UPSTREAM, messages=HI, max_tokens=2)
    body = upstream_sent(stack)
    assert body["max_tokens"] == 2 and "temperature" in body and "top_p" in body
    completion = api.chat.completions.create(model=UPSTREAM, messages=HI, max_tokens=2)
    assert completion.choices[0].finish_reason == "length"


def test_local_stop_seed_penalties_and_logit_bias_shape_the_reply(api, demo_model, workers):
    greedy = api.chat.completions.create(model=LOCAL, messages=HI, max_tokens=24).choices[0].message.content
    assert len(greedy) > 8
    stop = greedy[4:7]
    cut = api.chat.completions.create(model=LOCAL, messages=HI, max_tokens=24, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == greedy[:greedy.index(stop)]

    sampled = [api.chat.completions.create(model=LOCAL, messages=HI, max_tokens=16, temperature=1.0,
                                           seed=11).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]

    penalised = api.chat.completions.create(model=LOCAL, messages=HI, max_tokens=24, frequency_penalty=2.0,
                                            presence_penalty=2.0).choices[0].message.content
    assert penalised != greedy

    token = 40  # any id in the demo vocabulary: a bias of 100 makes greedy decoding pick it every time
    biased = api.chat.completions.create(model=LOCAL, messages=HI, max_tokens=5, logit_bias={str(token): 100})
    reply = Message.objects.get(pk=int(biased.id.removeprefix("chatcmpl-")))
    assert reply.completion_tokens == 5 and len(set(biased.choices[0].message.content)) <= 2
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=LOCAL, messages=HI, max_tokens=5, logit_bias={"99999999": 5})
    assert "logit_bias" in caught.value.message


# --- n ----------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", [LOCAL, OLLAMA, UPSTREAM])
def test_n_choices_come_back_each_with_its_index(api, demo_model, workers, stack, model, stream):
    choices = complete(api, stream, model=model, messages=HI, n=2, max_tokens=4)
    assert len(choices) == 2 and all(text for text, *_ in choices)
    assert all(finish in ("stop", "length") for _, finish, *_ in choices)
    usage = choices[0][3]
    assert usage.completion_tokens == sum(
        m.completion_tokens for m in Message.objects.filter(role="assistant").order_by("-pk")[:2])


def test_n_beyond_the_limit_is_refused_naming_n(api, demo_model):
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=LOCAL, messages=HI, n=50)
    assert caught.value.param == "n"


# --- tools --------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", [OLLAMA, UPSTREAM])
def test_tools_reach_the_backend_and_tool_calls_come_back(api, demo_model, workers, stack, model, stream):
    [(text, finish, calls, _)] = complete(api, stream, model=model, messages=[
        {"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER])
    assert finish == "tool_calls" and len(calls) == 1
    call = calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id and call.type == "function"
    sent = ollama_sent(stack) if model == OLLAMA else upstream_sent(stack)
    assert sent["tools"][0]["function"]["name"] == "get_weather"

    # The caller runs the tool and sends its result back.
    [(text, finish, calls, _)] = complete(api, stream, model=model, tools=[WEATHER], messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}])
    assert "Sunny, 21 C" in text and finish == "stop" and not calls
    sent = ollama_sent(stack) if model == OLLAMA else upstream_sent(stack)
    if model == OLLAMA:
        assert sent["messages"][1]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                                    "arguments": {"city": "Paris"}}
        assert sent["messages"][2] == {"role": "tool", "content": "Sunny, 21 C", "tool_name": "get_weather"}
    else:
        assert sent["messages"][2] == {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}


def test_tool_choice_none_sends_no_tools_and_an_upstream_gets_it_as_sent(api, demo_model, workers, stack):
    api.chat.completions.create(model=OLLAMA, messages=HI, tools=[WEATHER], tool_choice="none")
    assert not ollama_sent(stack).get("tools")
    forced = {"type": "function", "function": {"name": "get_weather"}}
    api.chat.completions.create(model=UPSTREAM, messages=HI, tools=[WEATHER], tool_choice=forced,
                                parallel_tool_calls=False)
    assert upstream_sent(stack)["tool_choice"] == forced and upstream_sent(stack)["parallel_tool_calls"] is False
    for name, value in (("tool_choice", forced), ("tool_choice", "required"), ("parallel_tool_calls", False)):
        with pytest.raises(openai.BadRequestError) as caught:
            api.chat.completions.create(model=OLLAMA, messages=HI, tools=[WEATHER], **{name: value})
        assert caught.value.param == name


def test_a_local_model_without_tools_in_its_template_refuses_them(api, demo_model, workers):
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=LOCAL, messages=HI, tools=[WEATHER])
    assert "template" in caught.value.message and caught.value.code == "invalid_request"


TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|tools|>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "{{ eos_token }}\n{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_a_local_model_whose_template_takes_tools_is_given_them(api, demo_model, workers, tmp_path):
    path = tmp_path / "local_tools"
    shutil.copytree(demo_model.path, path)
    (path / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    ModelConfig.objects.create(name="local_tools", kind=ModelKind.LOCAL, path=str(path), temperature=0.0,
                               max_new_tokens=4)
    catalog_forget()
    plain = api.chat.completions.create(model="local_tools", messages=HI, max_tokens=4)
    with_tools = api.chat.completions.create(model="local_tools", messages=HI, max_tokens=4, tools=[WEATHER])
    # The tool's definition was rendered into the prompt.
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 10
    assert with_tools.choices[0].finish_reason in ("stop", "length")


# --- JSON mode and images -----------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_json_mode_becomes_ollamas_format(api, demo_model, workers, stack, stream):
    [(text, *_)] = complete(api, stream, model=OLLAMA, messages=HI, response_format={"type": "json_object"})
    assert ollama_sent(stack)["format"] == "json" and isinstance(json.loads(text), dict)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    [(text, *_)] = complete(api, stream, model=OLLAMA, messages=HI, response_format={
        "type": "json_schema", "json_schema": {"name": "place", "schema": schema}})
    assert ollama_sent(stack)["format"] == schema and "city" in json.loads(text)


def test_json_mode_passes_to_an_upstream_and_is_refused_for_local_models(api, demo_model, workers, stack):
    api.chat.completions.create(model=UPSTREAM, messages=HI, response_format={"type": "json_object"})
    assert upstream_sent(stack)["response_format"] == {"type": "json_object"}
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=LOCAL, messages=HI, response_format={"type": "json_object"})
    assert caught.value.param == "response_format"
    api.chat.completions.create(model=LOCAL, messages=HI, max_tokens=2, response_format={"type": "text"})


def test_images_go_to_ollama_and_upstreams_and_local_models_refuse_them(api, demo_model, workers, stack):
    look = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}]}]
    text = api.chat.completions.create(model=OLLAMA, messages=look).choices[0].message.content
    sent = ollama_sent(stack)["messages"][0]
    assert sent["images"] == [PIXEL] and sent["content"] == "What is this?" and "1 image" in text
    api.chat.completions.create(model=UPSTREAM, messages=look)
    assert upstream_sent(stack)["messages"] == look
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=LOCAL, messages=look)
    assert caught.value.param == "messages" and "text only" in caught.value.message
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=OLLAMA, messages=remote)
    assert "data: URL" in caught.value.message


# --- refusals -------------------------------------------------------------------

@pytest.mark.parametrize("model,param,value", [
    (LOCAL, "logprobs", True), (OLLAMA, "logprobs", True), (OLLAMA, "logit_bias", {"1": 5}),
    (LOCAL, "reasoning_effort", "low"), (OLLAMA, "audio", {"voice": "alloy", "format": "mp3"}),
    (LOCAL, "store", True), (OLLAMA, "prediction", {"type": "content", "content": "x"}),
])
def test_what_a_backend_cannot_do_is_refused_naming_it(api, demo_model, workers, stack, model, param, value):
    before = Message.objects.count()
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=model, messages=HI, **{param: value})
    assert caught.value.param == param and caught.value.status_code == 400
    assert Message.objects.count() == before  # nothing stored, nothing queued


def test_unknown_and_malformed_parameters_are_refused_naming_them(api, demo_model):
    cases = [({"frobnicate": 1}, "frobnicate"), ({"temperature": 3}, "temperature"), ({"top_p": -1}, "top_p"),
             ({"max_tokens": 0}, "max_tokens"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
             ({"tools": [{"type": "function"}]}, "tools[0]"), ({"response_format": {"type": "yaml"}}, "response_format"),
             ({"logit_bias": {"x": 1}}, "logit_bias"), ({"seed": "1"}, "seed")]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            api.chat.completions.create(model=LOCAL, messages=HI, extra_body=extra)
        assert caught.value.param == param, extra
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=LOCAL, messages=HI, extra_body={"frobnicate": 1})
    assert caught.value.body["message"] == "Unrecognized request argument supplied: frobnicate"


def test_quiet_values_of_upstream_only_options_are_accepted_everywhere(api, demo_model, workers):
    completion = api.chat.completions.create(model=LOCAL, messages=HI, max_tokens=2, logprobs=False, store=False,
                                             modalities=["text"], service_tier="auto", user="someone")
    assert completion.choices[0].finish_reason == "length"
    reply = Message.objects.get(pk=int(completion.id.removeprefix("chatcmpl-")))
    assert reply.params["options"]["user"] == "someone"


# --- errors are OpenAI's JSON, for every method and path ---------------------------

def test_wrong_paths_and_methods_answer_openai_json_never_html_or_csrf(api_server, api_key):
    headers = {"Authorization": f"Bearer {api_key}"}
    for method, path in (("POST", "/v1/no/such/thing"), ("PUT", "/v1/nope"), ("POST", "/v1"), ("GET", "/v1")):
        answer = httpx.request(method, f"{api_server}{path}", headers=headers, json={"a": 1})
        assert answer.status_code == 404, (method, path)
        assert answer.headers["content-type"].startswith("application/json")
        assert answer.json()["error"]["message"].startswith("Invalid URL")
    for method, path in (("GET", "/v1/chat/completions"), ("POST", "/v1/models"), ("PATCH", "/v1/batches")):
        answer = httpx.request(method, f"{api_server}{path}", headers=headers, json={})
        assert answer.status_code == 405, (method, path)
        assert answer.json()["error"]["type"] == "invalid_request_error" and answer.headers["allow"]


def test_a_batch_line_honours_its_parameters(api, demo_model, workers, stack):
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": OLLAMA, "messages": HI, "max_tokens": 2, "stop": ["x"], "seed": 5}}
    upload = api.files.create(file=("in.jsonl", json.dumps(line).encode()), purpose="batch")
    batch = api.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert wait_for(lambda: api.batches.retrieve(batch.id).status == "completed", timeout=60)
    assert ollama_sent(stack)["options"] | {"num_predict": 2, "stop": ["x"], "seed": 5} == ollama_sent(stack)["options"]
    output = api.files.content(api.batches.retrieve(batch.id).output_file_id).text
    assert json.loads(output)["response"]["body"]["choices"][0]["finish_reason"] == "length"


def test_a_body_past_the_limit_gets_openais_413_and_a_large_image_is_taken(api, api_server, api_key, demo_model,
                                                                          workers, stack, settings):
    big = base64.b64encode(b"\x00" * (3 * 1024 * 1024)).decode()  # past Django's default 2.5 MB
    look = [{"role": "user", "content": [{"type": "text", "text": "and this?"},
                                         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{big}"}}]}]
    assert "1 image" in api.chat.completions.create(model=OLLAMA, messages=look).choices[0].message.content
    too_big = b'{"model": "local_demo", "messages": []' + b" " * settings.DATA_UPLOAD_MAX_MEMORY_SIZE + b"}"
    answer = httpx.post(f"{api_server}/v1/chat/completions", content=too_big, timeout=60,
                        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
    assert answer.status_code == 413 and "larger than" in answer.json()["error"]["message"]
