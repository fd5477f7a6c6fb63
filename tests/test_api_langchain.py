"""Issue 16: a real third-party client, LangChain's `ChatOpenAI`, against
the `/v1` API as LangChain users point it at us (`base_url`), with the
parameters it sets: max_tokens, stop, streaming, and tools bound with
`bind_tools`, against backends that answer with tool calls (the fake
Ollama's native tool calling, the fake upstream's)."""
from functools import reduce
from operator import add

import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

pytestmark = pytest.mark.django_db(transaction=True)

OLLAMA, UPSTREAM = "ollama_qwen:7b", "openai_gpt-4o-mini"


class GetWeather(BaseModel):
    """The weather in a city."""

    city: str


def chat_model(api_server: str, api_key: str, **settings) -> ChatOpenAI:
    return ChatOpenAI(base_url=f"{api_server}/v1", api_key=api_key, max_retries=0, timeout=60, **settings)


def test_max_tokens_and_stop_reach_ollama_and_the_finish_reason_is_true(api_server, api_key, demo_model,
                                                                        workers, stack):
    answer = chat_model(api_server, api_key, model=OLLAMA, max_tokens=3, stop=["zz"]).invoke("hi")
    options = stack.ollama.requests_to("/api/chat")[-1].body["options"]
    assert options["num_predict"] == 3 and options["stop"] == ["zz"]
    assert answer.response_metadata["finish_reason"] == "length"
    assert answer.usage_metadata["output_tokens"] == 3

    stack.ollama.reply = "one two three four"
    answer = chat_model(api_server, api_key, model=OLLAMA, stop=["three"]).invoke("count")
    assert answer.content.strip() == "one two" and answer.response_metadata["finish_reason"] == "stop"


def test_streaming_gives_the_whole_reply_in_pieces(api_server, api_key, demo_model, workers, stack):
    chunks = list(chat_model(api_server, api_key, model=UPSTREAM, max_tokens=50).stream("hi"))
    assert len(chunks) > 2
    assert "".join(c.content for c in chunks) == "Hello from fake OpenAI."
    sent = stack.openai.requests_to("/v1/chat/completions")[-1].body
    assert sent["stream"] is True and (sent.get("max_completion_tokens") or sent.get("max_tokens")) == 50


@pytest.mark.parametrize("model", [OLLAMA, UPSTREAM])
@pytest.mark.parametrize("stream", [False, True])
def test_bind_tools_gets_a_tool_call_and_takes_its_result_back(api_server, api_key, demo_model, workers,
                                                               model, stream):
    llm = chat_model(api_server, api_key, model=model).bind_tools([GetWeather])
    question = HumanMessage("What is the weather in Paris?")
    asked = reduce(add, llm.stream([question])) if stream else llm.invoke([question])
    assert [(c["name"], c["args"]) for c in asked.tool_calls] == [("GetWeather", {"city": "Paris"})]
    assert asked.tool_calls[0]["id"]

    result = ToolMessage("Sunny, 21 C", tool_call_id=asked.tool_calls[0]["id"])
    answer = llm.invoke([question, asked, result])
    assert "Sunny, 21 C" in answer.content and not answer.tool_calls
