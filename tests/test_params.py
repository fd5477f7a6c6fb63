"""Issue 16, the fast layer: the mapping of a request's options to each
backend (chat/params.py) and what a local generation does with them
(gpu_manager/generation.py). No stack: plain functions and a tensor."""
import pytest
import torch

from chat import params
from gpu_manager.generation import (
    GenerationRefused, Penalties, StopText, sequence_bias, template_takes_tools, tool_calls_parse,
)

ADMIN = {"max_new_tokens": 512, "temperature": 0.7, "top_p": 0.95}


def stream_through(stops, pieces):
    out = []
    text = StopText(stops, out.append)
    for piece in pieces:
        text.push(piece)
    text.flush()
    return out, text


def test_a_stop_sequence_split_across_pieces_is_never_streamed():
    out, text = stream_through(["END"], ["Hello E", "N", "D and more"])
    assert out == ["Hello "] and text.hit and text.text == "Hello "


def test_text_that_only_looked_like_a_stop_sequence_is_sent_in_full():
    out, text = stream_through(["END"], ["an E", "Nx"])
    assert "".join(out) == "an ENx" and not text.hit


def test_without_stop_sequences_every_piece_passes_at_once():
    out, _ = stream_through([], ["a", "b", "c"])
    assert out == ["a", "b", "c"]


def test_the_earliest_of_several_stop_sequences_wins():
    out, _ = stream_through(["two", "\n\n"], ["one\n\ntwo"])
    assert out == ["one"]


def test_penalties_follow_openais_formula_over_generated_tokens_only():
    scores = torch.zeros(1, 6)
    ids = torch.tensor([[5, 5, 1, 1, 1, 2]])  # prompt: [5, 5]; generated: 1, 1, 1, 2
    got = Penalties(prompt_tokens=2, presence=0.5, frequency=0.25)(ids, scores.clone())
    # token 1: 3 * 0.25 + 0.5; token 2: 0.25 + 0.5; token 5 (prompt only): untouched
    assert got.tolist() == [[0.0, -1.25, -0.75, 0.0, 0.0, 0.0]]


def test_logit_bias_becomes_sequence_bias_and_refuses_ids_beyond_the_vocabulary():
    assert sequence_bias({7: 100.0, 3: -5.0}, 10) == {(7,): 100.0, (3,): -5.0}
    assert sequence_bias({}, 10) is None
    with pytest.raises(GenerationRefused) as caught:
        sequence_bias({12: 1.0}, 10)
    assert caught.value.code == "invalid_request"


class Tokenizer:
    def __init__(self, template, response_template=None):
        self.chat_template = template
        self.response_template = response_template


def test_a_template_takes_tools_only_when_it_reads_them():
    assert template_takes_tools(Tokenizer("{% if tools %}{{ tools | tojson }}{% endif %}"))
    assert not template_takes_tools(Tokenizer("{% for m in messages %}{{ m.content }}{% endfor %}"))
    assert template_takes_tools(Tokenizer({"default": "x", "tool_use": "{{ tools }}"}))


def test_hermes_tool_calls_are_read_out_of_the_text():
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    rest, calls = tool_calls_parse(Tokenizer("{{ tools }}"), text, prompt="", tools=[])
    assert rest == "Let me look." and calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    rest, calls = tool_calls_parse(Tokenizer("{{ tools }}"), "<tool_call>{not json}</tool_call>", prompt="", tools=[])
    assert calls == [] and rest == "<tool_call>{not json}</tool_call>"


def test_ollama_gets_its_own_option_names_over_the_admin_defaults():
    options = params.options_parse({"max_completion_tokens": 3, "stop": "x", "seed": 1, "frequency_penalty": 1})
    assert params.ollama_arguments(options, ADMIN) == {"options": {
        "num_predict": 3, "temperature": 0.7, "top_p": 0.95, "stop": ["x"], "seed": 1, "frequency_penalty": 1}}
    assert params.ollama_arguments({}, ADMIN) == {"options": {"num_predict": 512, "temperature": 0.7, "top_p": 0.95}}
    schema = {"type": "object"}
    assert params.ollama_arguments({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema}}}, ADMIN)["format"] == schema


def test_an_upstream_gets_the_request_as_sent_and_defaults_only_for_what_it_left_out():
    assert params.openai_arguments({"max_completion_tokens": 3, "user": "u"}, ADMIN) == {
        "max_completion_tokens": 3, "user": "u", "temperature": 0.7, "top_p": 0.95}


def test_local_arguments_take_the_request_then_the_admin_defaults():
    got = params.local_arguments({"max_tokens": 4, "logit_bias": {"7": 5}, "tools": [1], "tool_choice": "none"}, ADMIN)
    assert got["max_new_tokens"] == 4 and got["temperature"] == 0.7 and got["logit_bias"] == {7: 5.0}
    assert got["tools"] is None  # tool_choice none: the model is given no tools


def test_tool_results_and_calls_are_translated_for_ollama_and_templates():
    messages = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    assert params.ollama_messages(messages) == [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "tool", "content": "42", "tool_name": "f"}]
    assert params.local_messages(messages)[1] == {"role": "tool", "content": "42", "name": "f"}


def test_ollama_images_are_bytes_never_a_string_its_client_could_read_as_a_path():
    [turn] = params.ollama_messages([{"role": "user", "content": [
        {"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}}]}])
    assert turn == {"role": "user", "content": "see", "images": [b"hi"]}
