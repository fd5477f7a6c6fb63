"""The OpenAI-compatible API (CONTRACT §6) through the official `openai`
client, against the web server as `make run` starts it, real Celery
workers and the fake Ollama and OpenAI servers."""
import json

import httpx
import openai
import pytest
from django.core.management import call_command

from chat.api.keys import api_key_create, api_key_digest
from chat.models import ApiKey, Message, ModelConfig
from tests.support.waiting import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


# --- keys -------------------------------------------------------------------

def test_missing_wrong_or_revoked_key_is_401_in_openai_shape(api_server, user):
    answer = httpx.get(f"{api_server}/v1/models")
    assert answer.status_code == 401
    error = answer.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert "Authorization" in error["message"]

    wrong = openai.OpenAI(base_url=f"{api_server}/v1", api_key="sk-chat-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.code == "invalid_api_key"

    key, raw = api_key_create(user=user)
    client = openai.OpenAI(base_url=f"{api_server}/v1", api_key=raw, max_retries=0)
    assert client.models.list().data is not None
    ApiKey.objects.filter(pk=key.pk).update(revoked_at="2026-01-01T00:00:00Z")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_create_api_key_prints_a_key_that_is_stored_hashed(api_server, user, demo_model, capsys):
    call_command("create_api_key", user.username, "--name", "laptop")
    raw = capsys.readouterr().out.strip()
    key = ApiKey.objects.get(user=user)
    assert key.name == "laptop" and key.digest == api_key_digest(raw)
    assert raw not in (key.digest, key.prefix) and raw.startswith(key.prefix)
    client = openai.OpenAI(base_url=f"{api_server}/v1", api_key=raw, max_retries=0)
    assert "local_demo" in [m.id for m in client.models.list()]
    assert ApiKey.objects.get(pk=key.pk).last_used_at is not None


# --- models and completions -------------------------------------------------

def test_models_list_names_every_model_users_can_pick(api, demo_model):
    models = {m.id: m for m in api.models.list()}
    assert {"local_demo", "ollama_qwen:7b", "openai_gpt-4o-mini"} <= set(models)
    assert models["local_demo"].owned_by == "local" and models["local_demo"].object == "model"
    assert api.models.retrieve("ollama_qwen:7b").id == "ollama_qwen:7b"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("no-such-model")


def test_completion_runs_through_the_chat_services(api, demo_model, workers):
    ModelConfig.objects.filter(pk=demo_model.pk).update(max_new_tokens=8)
    completion = api.chat.completions.create(model="local_demo", messages=[{"role": "user", "content": "hi"}])
    assert completion.object == "chat.completion" and completion.model == "local_demo"
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    # The reply is a Message like the websocket's, ended by the same task.
    reply = Message.objects.get(pk=int(completion.id.removeprefix("chatcmpl-")))
    assert reply.status == "done" and reply.model_name == "local_demo" and reply.content == choice.message.content
    assert completion.usage.completion_tokens == reply.completion_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_streaming_completion_is_sse_chunks_ending_with_done(api, api_server, api_key, demo_model, workers, stack):
    stream = api.chat.completions.create(model="ollama_qwen:7b", stream=True,
                                         stream_options={"include_usage": True},
                                         messages=[{"role": "user", "content": "count"}])
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == stack.ollama.reply
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0

    # On the wire: `data: {…}` events, then `data: [DONE]`; without
    # include_usage the usage rides on the last chunk.
    body = {"model": "openai_gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", f"{api_server}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {api_key}"}) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        events = [line for line in answer.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "stop" and last["usage"]["completion_tokens"] > 0


def test_a_client_that_hangs_up_stops_its_reply(api_server, api_key, demo_model, workers, stack):
    stack.ollama.reply = " ".join(f"w{i}" for i in range(400))
    stack.ollama.token_delay = 0.02  # 8 s in all: far longer than the test waits
    body = {"model": "ollama_qwen:7b", "stream": True, "messages": [{"role": "user", "content": "go on"}]}
    with httpx.stream("POST", f"{api_server}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {api_key}"}) as answer:
        first = json.loads(next(line for line in answer.iter_lines() if line).removeprefix("data: "))
    reply_id = int(first["id"].removeprefix("chatcmpl-"))
    reply = wait_for(lambda: Message.objects.filter(pk=reply_id, status="cancelled").first(), timeout=10,
                     what="the reply to stop")
    assert reply.finish_reason == "cancelled" and len(reply.content) < len(stack.ollama.reply)


def test_the_whole_history_reaches_the_model(api, demo_model, workers, stack):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one"},
                {"role": "assistant", "content": "two"},
                {"role": "user", "content": [{"type": "text", "text": "three"}]}]
    api.chat.completions.create(model="openai_gpt-4o-mini", messages=messages)
    sent = stack.openai.requests_to("/v1/chat/completions")[-1].body["messages"]
    assert sent == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one"},
                    {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}]


def test_errors_have_openai_shapes_and_statuses(api, demo_model, workers, stack):
    with pytest.raises(openai.NotFoundError) as caught:
        api.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model="local_demo", messages=[])
    assert caught.value.param == "messages"
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model="local_demo", messages=[{"role": "user", "content": "  "}])

    # Accepted, then failed in the worker: the reply's chat.error becomes the
    # HTTP error, streamed or not (it came before any text).
    api.models.list()  # the catalog caches the Ollama tag ...
    stack.ollama.models = ()  # ... which the server then loses
    with pytest.raises(openai.NotFoundError) as caught:
        api.chat.completions.create(model="ollama_qwen:7b", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="ollama_qwen:7b", stream=True,
                                    messages=[{"role": "user", "content": "hi"}])

    stack.openai.fail_status = 500
    with pytest.raises(openai.InternalServerError) as caught:
        api.chat.completions.create(model="openai_gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502 and caught.value.type == "server_error"


def test_unknown_path_and_method_answer_in_openai_shape(api_server, api_key):
    headers = {"Authorization": f"Bearer {api_key}"}
    answer = httpx.get(f"{api_server}/v1/no/such/thing", headers=headers)
    assert answer.status_code == 404 and "error" in answer.json()
    answer = httpx.delete(f"{api_server}/v1/chat/completions", headers=headers)
    assert answer.status_code == 405 and answer.json()["error"]["type"] == "invalid_request_error"
