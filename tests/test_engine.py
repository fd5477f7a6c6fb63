"""LocalEngine.generate on the demo model, in this process: the text it
streams, Stop, the deadline. Plain pytest, no database."""
import time

import pytest
import torch

from gpu_manager.demo_model import demo_model_create
from gpu_manager.engines import LocalEngine, _relay, _StreamRelay, _TextRelay

PROMPTS = ["hi", "Tell me a story", "你好"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = demo_model_create(path=tmp_path_factory.mktemp("models") / "local_demo")
    engine = LocalEngine(name="local_demo", path=str(path), device="cpu")
    engine.load()
    yield engine
    assert engine.unload() == {}


def _generated_text(engine: LocalEngine, content: str, max_new_tokens: int) -> str:
    """What model.generate makes of the same prompt, greedy, decoded at once."""
    inputs = engine.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=engine.tokenizer.pad_token_id)
    return engine.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_the_demo_tokenizer_streams_incrementally(engine):
    assert isinstance(_relay(engine.tokenizer, lambda text: None), _StreamRelay)


@pytest.mark.parametrize("content", PROMPTS)
def test_streamed_pieces_add_up_to_the_reply(engine, content):
    pieces = []
    result = engine.generate([{"role": "user", "content": content}], max_new_tokens=96, temperature=0.0,
                             top_p=1.0, on_text=pieces.append, should_stop=lambda: False)
    assert result.completion_tokens == 96 and result.finish_reason == "length"
    assert all(pieces) and len(pieces) > 48  # streamed as it goes, not at the end
    assert "".join(pieces) == result.text == _generated_text(engine, content, 96)


def test_sampling_streams_too(engine):
    pieces = []
    result = engine.generate([{"role": "user", "content": "hi"}], max_new_tokens=64, temperature=0.8, top_p=0.9,
                             on_text=pieces.append, should_stop=lambda: False)
    assert result.completion_tokens == 64 and "".join(pieces) == result.text


def test_stop_is_checked_between_tokens(engine):
    calls, pieces = [], []

    def should_stop() -> bool:
        calls.append(None)
        return len(calls) >= 5

    result = engine.generate([{"role": "user", "content": "hi"}], max_new_tokens=200, temperature=0.0, top_p=1.0,
                             on_text=pieces.append, should_stop=should_stop)
    assert result.finish_reason == "cancelled"
    assert result.completion_tokens == 5 and len(calls) == 5
    assert "".join(pieces) == result.text == _generated_text(engine, "hi", 5)


def test_a_past_deadline_ends_after_one_token(engine):
    result = engine.generate([{"role": "user", "content": "hi"}], max_new_tokens=200, temperature=0.0, top_p=1.0,
                             on_text=lambda text: None, should_stop=lambda: False,
                             deadline=time.monotonic() - 1)
    assert result.finish_reason == "length" and result.completion_tokens == 1


@pytest.mark.parametrize("relay_class", [_StreamRelay, _TextRelay])
def test_a_character_split_over_tokens_goes_out_whole(engine, relay_class):
    tokenizer = engine.tokenizer
    ids = tokenizer("héllo 你好 world", add_special_tokens=False)["input_ids"]
    pieces = []
    relay = relay_class(tokenizer, pieces.append)
    relay.put(torch.tensor([[0, 1]]))  # the prompt: not streamed
    for token in ids:
        relay.put(torch.tensor([token]))
    relay.end()
    assert "".join(pieces) == "héllo 你好 world"
    assert "\ufffd" not in "".join(pieces)


def test_an_incomplete_character_at_the_end_is_flushed(engine):
    tokenizer = engine.tokenizer
    (a,) = tokenizer("a", add_special_tokens=False)["input_ids"]
    first_byte = tokenizer("é", add_special_tokens=False)["input_ids"][0]  # é is two byte tokens
    pieces = []
    relay = _StreamRelay(tokenizer, pieces.append)
    relay.put(torch.tensor([[0]]))
    relay.put(torch.tensor([a]))
    relay.put(torch.tensor([first_byte]))
    assert pieces == ["a"]  # held: half a character
    relay.end()
    assert pieces == ["a", "\ufffd"] and "".join(pieces) == tokenizer.decode([a, first_byte])
