"""The demo model and the private Redis: plain pytest, no database."""

import socket
import time

import pytest
import redis

from chatsite.redis_server import PrivateRedis, RedisAlreadyRunning, port_is_free
from gpu_manager.demo_model import demo_model_create

PROMPTS = ["hi", "Tell me a story", "你好"]


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory):
    return demo_model_create(path=tmp_path_factory.mktemp("models") / "local_demo")


@pytest.fixture(scope="module")
def demo(demo_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(demo_path), AutoTokenizer.from_pretrained(demo_path)


def _chat_inputs(tokenizer, content):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )


def test_demo_model_is_a_small_llama_with_safetensors(demo_path, demo):
    model, tokenizer = demo
    assert (demo_path / "model.safetensors").is_file()
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    assert 512 <= len(tokenizer) <= 1000
    assert not model.config.tie_word_embeddings
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_chat_template_opens_the_assistant_turn_only_when_asked(demo):
    _, tokenizer = demo
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    with_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    without = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert "<|system|>\nBe brief." in with_prompt
    assert with_prompt.endswith("<|assistant|>\n")
    assert not without.endswith("<|assistant|>\n")

    inputs = _chat_inputs(tokenizer, "你好")
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape
    assert tokenizer.unk_token_id not in inputs["input_ids"][0].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_generation_never_stops_early(demo, prompt):
    import torch

    model, tokenizer = demo
    inputs = _chat_inputs(tokenizer, prompt)
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=64)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    assert len(new_tokens) == 64
    assert tokenizer.eos_token_id not in new_tokens.tolist()
    assert tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def test_second_create_returns_at_once_without_rewriting(demo_path):
    before = {f.name: f.stat().st_mtime_ns for f in demo_path.iterdir()}
    started = time.perf_counter()
    assert demo_model_create(path=demo_path) == demo_path
    assert time.perf_counter() - started < 0.1
    assert {f.name: f.stat().st_mtime_ns for f in demo_path.iterdir()} == before


def test_create_replaces_a_half_written_model_and_leaves_no_staging(tmp_path):
    path = tmp_path / "local_demo"
    path.mkdir()
    (path / "config.json").write_text("{}")
    demo_model_create(path=path, seed=3)
    assert (path / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["local_demo"]


def test_same_seed_builds_the_same_weights(tmp_path, demo_path):
    again = demo_model_create(path=tmp_path / "local_demo", seed=0)
    assert (again / "model.safetensors").read_bytes() == (demo_path / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (demo_path / "tokenizer.json").read_bytes()


def test_private_redis_answers_and_frees_its_port(tmp_path):
    server = PrivateRedis(directory=tmp_path / "redis")
    url = server.start()
    try:
        assert url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(url)
        assert client.ping()
        client.close()
    finally:
        server.stop()
    assert port_is_free(server.port)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_private_redis_refuses_a_second_server_on_its_directory(tmp_path):
    with PrivateRedis(directory=tmp_path / "redis") as first:
        with pytest.raises(RedisAlreadyRunning, match=first.url):
            PrivateRedis(directory=tmp_path / "redis").start()
        assert redis.Redis.from_url(first.url).ping()
    # Once the first one stopped, the directory is free again.
    with PrivateRedis(directory=tmp_path / "redis", port=first.port) as second:
        assert second.url == first.url


def test_private_redis_keeps_its_data_across_a_restart(tmp_path):
    """The broker's queues survive a restart of Redis (its append-only file)."""
    with PrivateRedis(directory=tmp_path / "redis") as first:
        client = redis.Redis.from_url(first.url)
        client.rpush("gpu.0", "a queued task")
        client.close()
    with PrivateRedis(directory=tmp_path / "redis", port=first.port) as second:
        client = redis.Redis.from_url(second.url)
        assert client.lrange("gpu.0", 0, -1) == [b"a queued task"]
        client.close()
