"""The fake outside servers, exercised through the official clients only.

If these pass, code under test that uses ``ollama`` / ``openai`` can be
pointed at the fakes and sees the real wire protocols.  Plain pytest, no
Django.
"""
import threading
import time

import httpx
import ollama
import openai
import pytest

from tests.fakes import FakeOllama, FakeOpenAI, split_tokens
from tests.support.waiting import wait_for

pytestmark = []

MODEL = "qwen:7b"
MSGS = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def fake_ollama():
    with FakeOllama(models=(MODEL, "llama3:8b")) as fake:
        yield fake


@pytest.fixture
def fake_openai():
    with FakeOpenAI() as fake:
        yield fake


def oclient(fake, **kw):
    return ollama.Client(host=fake.url, **kw)


def aclient(fake, key="sk-test"):
    return openai.OpenAI(base_url=fake.url + "/v1", api_key=key, max_retries=0)


@pytest.mark.parametrize("text", ["Hello from fake.", "  lead and  trail  ", "one", "", "a\nb\tc"])
def test_split_tokens_round_trips(text):
    assert "".join(split_tokens(text)) == text


# -- Ollama ---------------------------------------------------------------------
def test_ollama_list_and_version(fake_ollama):
    names = [m.model for m in oclient(fake_ollama).list().models]
    assert names == [MODEL, "llama3:8b"]
    assert httpx.get(fake_ollama.url + "/api/version").json() == {"version": "0.12.0"}
    assert httpx.get(fake_ollama.url + "/api/nope").status_code == 404


def test_ollama_chat_stream_and_ps(fake_ollama):
    client = oclient(fake_ollama)
    assert client.ps().models == []
    parts = list(client.chat(model=MODEL, messages=MSGS, stream=True))
    assert "".join(p.message.content for p in parts) == fake_ollama.reply
    assert len(parts) == len(split_tokens(fake_ollama.reply)) + 1
    assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].eval_count == 4
    assert not any(p.done for p in parts[:-1])
    ps = client.ps().models
    assert [m.model for m in ps] == [MODEL] and ps[0].size_vram == fake_ollama.size_vram
    assert fake_ollama.loaded_models() == [MODEL]


def test_ollama_chat_non_stream(fake_ollama):
    fake_ollama.reply = "Just one answer."
    resp = oclient(fake_ollama).chat(model=MODEL, messages=MSGS, stream=False)
    assert resp.message.content == "Just one answer." and resp.done
    assert fake_ollama.requests_to("/api/chat")[0].body["stream"] is False


def test_ollama_generate_keep_alive_zero_unloads_after_delay(fake_ollama):
    fake_ollama.unload_delay = 0.3
    client = oclient(fake_ollama)
    client.generate(model=MODEL)  # empty prompt: a load
    assert [m.model for m in client.ps().models] == [MODEL]
    resp = client.generate(model=MODEL, keep_alive=0)
    assert resp.done_reason == "unload"
    # Answered before VRAM is free: still listed right after the reply ...
    assert [m.model for m in client.ps().models] == [MODEL]
    # ... and gone once unload_delay has passed.
    assert wait_for(lambda: client.ps().models == [], timeout=5)


def test_ollama_chat_unload_and_keep_alive_zero(fake_ollama):
    client = oclient(fake_ollama)
    fake_ollama.load("llama3:8b")
    resp = client.chat(model="llama3:8b", messages=[], keep_alive=0)
    assert resp.done_reason == "unload" and resp.message.content == ""
    assert wait_for(lambda: fake_ollama.loaded_models() == [], timeout=5)
    text = "".join(p.message.content for p in
                   client.chat(model=MODEL, messages=MSGS, stream=True, keep_alive="0s"))
    assert text == fake_ollama.reply
    assert wait_for(lambda: client.ps().models == [], timeout=5)


def test_ollama_unknown_model_is_404(fake_ollama):
    with pytest.raises(ollama.ResponseError) as err:
        list(oclient(fake_ollama).chat(model="nope:1b", messages=MSGS, stream=True))
    assert err.value.status_code == 404
    assert err.value.error == 'model "nope:1b" not found, try pulling it first'


def test_ollama_fail_500(fake_ollama):
    fake_ollama.fail = "500"
    with pytest.raises(ollama.ResponseError) as err:
        oclient(fake_ollama).chat(model=MODEL, messages=MSGS)
    assert err.value.status_code == 500


def test_ollama_close_midway(fake_ollama):
    fake_ollama.fail = "close_midway"
    got = []
    with pytest.raises(httpx.RemoteProtocolError):  # the body ends before its last chunk
        for part in oclient(fake_ollama).chat(model=MODEL, messages=MSGS, stream=True):
            got.append(part)
    assert "".join(p.message.content for p in got) == "Hello from"
    assert not any(p.done for p in got)


def test_ollama_slow_is_recorded_on_arrival(fake_ollama):
    fake_ollama.fail, fake_ollama.slow_seconds = "slow", 0.5
    done = threading.Event()

    def call():
        oclient(fake_ollama).chat(model=MODEL, messages=MSGS)
        done.set()

    started = time.monotonic()
    threading.Thread(target=call, daemon=True).start()
    assert wait_for(lambda: fake_ollama.requests_to("/api/chat"), timeout=5)
    assert not done.is_set()  # recorded before any reply was sent
    assert done.wait(5) and time.monotonic() - started >= 0.5
    with pytest.raises(httpx.ReadTimeout):
        oclient(fake_ollama, timeout=0.1).chat(model=MODEL, messages=MSGS)


def test_ollama_token_delay_streams_incrementally(fake_ollama):
    fake_ollama.token_delay = 0.1
    started, arrivals = time.monotonic(), []
    for _ in oclient(fake_ollama).chat(model=MODEL, messages=MSGS, stream=True):
        arrivals.append(time.monotonic() - started)
    # Chunks arrive spread over the delays, not all at once at the end: a
    # lower bound, which load on the machine can only make larger.
    assert arrivals[-1] - arrivals[0] >= 0.1 * (len(arrivals) - 2)


def test_ollama_stop_start_same_port(fake_ollama):
    client = oclient(fake_ollama)
    client.chat(model=MODEL, messages=MSGS)
    url = fake_ollama.url
    fake_ollama.stop()
    assert fake_ollama.url is None and not fake_ollama.running
    with pytest.raises(ConnectionError):  # the ollama client's own translation of a refused connect
        client.list()
    fake_ollama.start()
    assert fake_ollama.url == url
    assert [m.model for m in client.list().models] == [MODEL, "llama3:8b"]
    assert client.ps().models == []  # a restarted Ollama has nothing loaded


def test_ollama_stop_drops_in_flight_request(fake_ollama):
    fake_ollama.fail, fake_ollama.slow_seconds = "slow", 30
    errors = []

    def call():
        try:
            oclient(fake_ollama).chat(model=MODEL, messages=MSGS)
        except Exception as exc:  # noqa: BLE001 - we assert on the type below
            errors.append(exc)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    assert wait_for(lambda: fake_ollama.requests_to("/api/chat"), timeout=5)
    fake_ollama.stop()
    worker.join(5)
    # The connection is dropped under the waiting client: read as a reset
    # (ReadError) or as an end before any response (RemoteProtocolError),
    # whichever of the two the kernel reports first.
    assert not worker.is_alive() and len(errors) == 1, errors
    assert type(errors[0]) in (httpx.ReadError, httpx.RemoteProtocolError), errors


# -- OpenAI ---------------------------------------------------------------------
def test_openai_models_list(fake_openai):
    assert [m.id for m in aclient(fake_openai).models.list()] == ["gpt-4o-mini"]
    assert aclient(fake_openai).models.retrieve("gpt-4o-mini").owned_by == "fake"


def test_openai_chat_non_stream(fake_openai):
    resp = aclient(fake_openai).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert resp.choices[0].message.content == fake_openai.reply
    assert resp.choices[0].finish_reason == "stop" and resp.object == "chat.completion"
    assert resp.usage.completion_tokens == 4
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 4


def test_openai_chat_stream_with_usage(fake_openai):
    stream = aclient(fake_openai).chat.completions.create(
        model="gpt-4o-mini", messages=MSGS, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == fake_openai.reply
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


def test_openai_stream_without_usage_and_max_tokens(fake_openai):
    chunks = list(aclient(fake_openai).chat.completions.create(
        model="gpt-4o-mini", messages=MSGS, stream=True, max_tokens=2))
    assert all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from"
    assert chunks[-1].choices[0].finish_reason == "length"
    resp = aclient(fake_openai).chat.completions.create(
        model="gpt-4o-mini", messages=MSGS, max_completion_tokens=1)
    assert resp.choices[0].message.content == "Hello"
    assert resp.choices[0].finish_reason == "length"


def test_openai_wrong_key(fake_openai):
    with pytest.raises(openai.AuthenticationError) as err:
        aclient(fake_openai, key="sk-wrong").models.list()
    assert err.value.code == "invalid_api_key" and err.value.status_code == 401


def test_openai_failures(fake_openai):
    client = aclient(fake_openai)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=MSGS)
    assert err.value.code == "model_not_found"
    fake_openai.fail_status = 429
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert err.value.code == "rate_limit_exceeded"
    fake_openai.fail_status = 500
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=True)


def test_openai_slow(fake_openai):
    fake_openai.slow_seconds = 5
    client = openai.OpenAI(base_url=fake_openai.url + "/v1", api_key="sk-test",
                           max_retries=0, timeout=0.2)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)


# -- recording --------------------------------------------------------------------
def test_requests_recorded_in_order(fake_ollama):
    client = oclient(fake_ollama)
    client.list()
    client.chat(model=MODEL, messages=MSGS, options={"temperature": 0})
    client.generate(model=MODEL, keep_alive=0)
    client.ps()
    recs = fake_ollama.requests
    assert [(r.method, r.path) for r in recs] == [
        ("GET", "/api/tags"), ("POST", "/api/chat"), ("POST", "/api/generate"), ("GET", "/api/ps")]
    assert recs[0].body is None
    assert recs[1].body["messages"] == MSGS and recs[1].body["options"] == {"temperature": 0}
    assert recs[2].body["keep_alive"] == 0
    assert all(a.at <= b.at for a, b in zip(recs, recs[1:]))
    assert recs[1].headers["content-type"] == "application/json"
    assert len(fake_ollama.requests_to("/api/chat")) == 1
    fake_ollama.reply = "kept"
    fake_ollama.clear()
    assert fake_ollama.requests == [] and fake_ollama.reply == "kept"


def test_openai_records_auth_header(fake_openai):
    aclient(fake_openai).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    (rec,) = fake_openai.requests_to("/v1/chat/completions")
    assert rec.method == "POST" and rec.headers["authorization"] == "Bearer sk-test"
    assert rec.body["model"] == "gpt-4o-mini" and rec.body["messages"] == MSGS
