"""The real ``openai`` library against vramgate fronting real llama-servers, beyond the happy
paths: the Responses API, structured output, a prompt longer than the server's context, and a
model server that dies mid-stream. Random weights write nonsense, so the structured tests let
llama-server's grammar (from the JSON schema) decide the shape."""

from __future__ import annotations

import json

import openai
import pytest

from conftest import LARGE_MODEL, TOOLS_MODEL
from harness import MAX_TOKENS, MODEL_IDS, Daemon, kill_model_server

MODEL = MODEL_IDS[0]
MESSAGES = [{"role": "user", "content": "hello, say a short answer please"}]
# Far beyond the suite's --ctx-size 1024: every "hello " is several tokens.
TOO_LONG = "hello " * 3000
# Small and closed, so the grammar ends the answer within a few dozen tokens.
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "city": {"type": "string", "enum": ["Paris", "Rome"]}},
    "required": ["ok", "city"],
    "additionalProperties": False,
}


def _client(daemon: Daemon) -> openai.OpenAI:
    # No retries: a call that fails must fail here, not be hidden by the library trying again.
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def client(daemon: Daemon) -> openai.OpenAI:
    return _client(daemon)


def _matches_schema(value: object) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"ok", "city"}
        and isinstance(value["ok"], bool)
        and value["city"] in ("Paris", "Rome")
    )


def test_responses_not_streamed(client: openai.OpenAI) -> None:
    answer = client.responses.create(model=MODEL, input="hello world", max_output_tokens=MAX_TOKENS)
    assert answer.status == "completed", answer
    assert answer.model == MODEL
    assert isinstance(answer.output_text, str) and answer.output_text, answer
    assert answer.output[0].type == "message" and answer.output[0].role == "assistant", answer.output
    assert answer.usage is not None
    assert answer.usage.output_tokens == MAX_TOKENS
    assert answer.usage.input_tokens > 0


def test_responses_streamed(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=MODEL, input="hello world", max_output_tokens=MAX_TOKENS, stream=True))
    types = [event.type for event in events]
    assert types[0] == "response.created", types
    assert types[-1] == "response.completed", types
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) == MAX_TOKENS, types
    done = [event.text for event in events if event.type == "response.output_text.done"]
    assert done == ["".join(deltas)], (done, deltas)
    completed = events[-1].response
    assert completed.output_text == "".join(deltas)
    assert completed.usage is not None and completed.usage.output_tokens == MAX_TOKENS


def test_chat_with_a_json_schema_answers_json_that_matches_it(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=100,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": SCHEMA}},
    )
    assert answer.choices[0].finish_reason == "stop", answer
    content = answer.choices[0].message.content
    assert content is not None
    assert _matches_schema(json.loads(content)), content


def test_a_prompt_longer_than_the_context_is_a_bad_request(client: openai.OpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": TOO_LONG}], max_tokens=4, stream=stream
            )
        assert raised.value.status_code == 400
        assert "context" in str(raised.value), raised.value


def test_an_embedding_input_over_the_servers_batch_is_its_own_500(client: openai.OpenAI) -> None:
    # llama-server refuses an input longer than its physical batch with a 500 that names the fix;
    # the OpenAI surface passes the server's answer on as it is.
    with pytest.raises(openai.InternalServerError) as raised:
        client.embeddings.create(model=MODEL, input=TOO_LONG)
    assert raised.value.status_code == 500
    assert "batch size" in str(raised.value), raised.value


def test_a_server_killed_mid_stream_is_an_api_error_and_the_next_request_works(large_daemon: Daemon) -> None:
    client = _client(large_daemon)
    stream = client.chat.completions.create(
        model=LARGE_MODEL, messages=MESSAGES, max_tokens=900, stream=True
    )
    chunks = iter(stream)
    # The first token: the server is up and generating (900 tokens take it seconds).
    first = next((c for c in chunks if c.choices and c.choices[0].delta.content), None)
    assert first is not None, "the stream ended without a token"
    pid = kill_model_server(large_daemon, LARGE_MODEL)
    with pytest.raises(openai.APIError) as raised:
        for _ in chunks:
            pass
    # The stream was open, so the library raises from an error event vramgate wrote into it, not
    # a broken connection.
    assert not isinstance(raised.value, openai.APIConnectionError), repr(raised.value)
    message = str(raised.value)
    assert "failed mid-answer" in message, message
    stream.close()

    # Sent at once, maybe before vramgate has seen the crash: it finds the server gone (nothing
    # of it reached a live server), so vramgate restarts the model and sends it again.
    answer = client.chat.completions.create(model=LARGE_MODEL, messages=MESSAGES, max_tokens=4)
    assert answer.usage is not None and answer.usage.completion_tokens == 4
    restarted = large_daemon.model(LARGE_MODEL)
    assert restarted["state"] == "ready" and restarted["pid"] != pid, restarted


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
]
WEATHER = [{"role": "user", "content": "what is the weather in Paris?"}]


def _weather_arguments(arguments: str) -> bool:
    value = json.loads(arguments)
    return isinstance(value, dict) and set(value) == {"city"} and value["city"] in ("Paris", "Rome")


def test_chat_with_tools_required_answers_a_tool_call(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=TOOLS_MODEL, messages=WEATHER, tools=TOOLS, tool_choice="required", max_tokens=200
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", answer
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1, choice.message
    assert calls[0].type == "function" and calls[0].id
    assert calls[0].function.name == "get_weather"
    assert _weather_arguments(calls[0].function.arguments), calls[0].function.arguments


def test_chat_with_tools_streamed_assembles_a_tool_call(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=TOOLS_MODEL, messages=WEATHER, tools=TOOLS, max_tokens=200, stream=True
    )
    name, arguments, finishes = "", "", []
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        for call in choice.delta.tool_calls or []:
            assert call.index == 0, call
            name += (call.function.name or "") if call.function else ""
            arguments += (call.function.arguments or "") if call.function else ""
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
    assert finishes == ["tool_calls"], finishes
    assert name == "get_weather"
    assert _weather_arguments(arguments), arguments
