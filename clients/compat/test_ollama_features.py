"""The real ``ollama`` library against vramgate fronting real llama-servers, beyond the happy
paths: structured output (``format``), ``think``, and a model server that dies mid-stream. Random
weights write nonsense, so the structured tests let llama-server's grammar (from the JSON schema)
decide the shape."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest

from conftest import LARGE_MODEL, TOOLS_MODEL
from harness import MAX_TOKENS, MODEL_IDS, Daemon, kill_model_server

MODEL = MODEL_IDS[0]
MESSAGES = [{"role": "user", "content": "hello, say a short answer please"}]
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "city": {"type": "string", "enum": ["Paris", "Rome"]}},
    "required": ["ok", "city"],
    "additionalProperties": False,
}


@pytest.fixture
def client(daemon: Daemon) -> ollama.Client:
    return ollama.Client(host=daemon.url, timeout=60)


def _matches_schema(text: str) -> bool:
    value = json.loads(text)
    return (
        isinstance(value, dict)
        and set(value) == {"ok", "city"}
        and isinstance(value["ok"], bool)
        and value["city"] in ("Paris", "Rome")
    )


def test_chat_with_a_format_schema_answers_json_that_matches_it(client: ollama.Client) -> None:
    answer = client.chat(model=MODEL, messages=MESSAGES, format=SCHEMA, options={"num_predict": 100}, stream=False)
    assert answer.done_reason == "stop", answer
    assert _matches_schema(answer.message.content or ""), answer.message.content


def test_generate_with_a_format_schema_answers_json_that_matches_it(client: ollama.Client) -> None:
    answer = client.generate(
        model=MODEL, prompt="hello world", format=SCHEMA, options={"num_predict": 100}, stream=False
    )
    assert answer.done_reason == "stop", answer
    assert _matches_schema(answer.response), answer.response


@pytest.mark.parametrize("think", [True, False])
def test_chat_with_think_answers(client: ollama.Client, think: bool) -> None:
    # The synthetic model has no reasoning: llama-server answers plain content either way, and
    # vramgate passes no `thinking` it was not given.
    answer = client.chat(
        model=MODEL, messages=MESSAGES, think=think, options={"num_predict": MAX_TOKENS}, stream=False
    )
    assert answer.done is True and answer.done_reason == "length", answer
    assert answer.eval_count == MAX_TOKENS
    assert answer.message.content, answer
    assert not answer.message.thinking, answer


def test_think_reaches_the_models_chat_template(client: ollama.Client) -> None:
    # The synthetic model's template writes forty words more into the prompt when thinking is
    # off (Qwen 3's writes an empty thought). prompt_eval_count is what llama-server evaluated: a
    # prompt it has cached (in part) counts less, so the first call is the one with the words,
    # on messages no other test sends; the others then find their whole prompt cached, or not.
    messages = [{"role": "user", "content": "think about it"}]

    def prompt_tokens(**think: bool) -> int:
        answer = client.chat(model=MODEL, messages=messages, options={"num_predict": 1}, stream=False, **think)
        assert answer.prompt_eval_count, answer
        return answer.prompt_eval_count

    off, on, default = prompt_tokens(think=False), prompt_tokens(think=True), prompt_tokens()
    assert off > 40 + max(on, default), (off, on, default)


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_longer_than_the_context_is_a_response_error(client: ollama.Client, stream: bool) -> None:
    # Far beyond the suite's --ctx-size 1024. llama-server refuses it (Ollama itself would cut the
    # prompt to num_ctx instead); vramgate passes the refusal on as Ollama's error shape.
    with pytest.raises(ollama.ResponseError) as raised:
        answer = client.chat(
            model=MODEL, messages=[{"role": "user", "content": "hello " * 3000}], options={"num_predict": 4}, stream=stream
        )
        if stream:
            list(answer)
    assert raised.value.status_code == 400
    assert "context" in raised.value.error, raised.value.error


def test_an_embedding_input_over_the_servers_batch_is_a_502_with_its_message(client: ollama.Client) -> None:
    # llama-server answers a 500 (a limit of its configuration, --ubatch-size, not of the request):
    # the Ollama surface reports the server's failure as a 502 that carries its message.
    with pytest.raises(ollama.ResponseError) as raised:
        client.embed(model=MODEL, input="hello " * 3000)
    assert raised.value.status_code == 502
    assert "batch size" in raised.value.error, raised.value.error


def test_a_server_killed_mid_stream_is_a_response_error_and_the_next_request_works(large_daemon: Daemon) -> None:
    client = ollama.Client(host=large_daemon.url, timeout=60)
    parts = iter(
        client.chat(model=LARGE_MODEL, messages=MESSAGES, options={"num_predict": 900}, stream=True)
    )
    # The first token: the server is up and generating (900 tokens take it seconds).
    first = next(parts)
    assert first.done is False and first.message.content, first
    pid = kill_model_server(large_daemon, LARGE_MODEL)
    with pytest.raises(Exception) as raised:
        for _ in parts:
            pass
    # The error line vramgate writes into the open stream, not a broken connection.
    assert isinstance(raised.value, ollama.ResponseError), repr(raised.value)
    assert not isinstance(raised.value, httpx.HTTPError)
    assert "failed mid-answer" in raised.value.error, raised.value.error

    # Sent at once, maybe before vramgate has seen the crash: it finds the server gone, so vramgate
    # restarts the model and sends it again.
    answer = client.chat(model=LARGE_MODEL, messages=MESSAGES, options={"num_predict": 4}, stream=False)
    assert answer.done is True and answer.eval_count == 4, answer
    restarted = large_daemon.model(LARGE_MODEL)
    assert restarted["state"] == "ready" and restarted["pid"] != pid, restarted


WEATHER = [{"role": "user", "content": "what is the weather in Paris?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
        },
    },
}


@pytest.mark.parametrize("stream", [False, True])
def test_chat_with_tools_answers_tool_calls(client: ollama.Client, stream: bool) -> None:
    if stream:
        parts = list(client.chat(model=TOOLS_MODEL, messages=WEATHER, tools=[WEATHER_TOOL], stream=True))
        assert parts[-1].done is True, parts
        calls = [call for part in parts for call in (part.message.tool_calls or [])]
    else:
        answer = client.chat(model=TOOLS_MODEL, messages=WEATHER, tools=[WEATHER_TOOL], stream=False)
        assert answer.done is True, answer
        calls = list(answer.message.tool_calls or [])
    assert len(calls) == 1, calls
    assert calls[0].function.name == "get_weather"
    # The library parses the arguments into a mapping (Ollama sends an object, not a string).
    assert dict(calls[0].function.arguments) in ({"city": "Paris"}, {"city": "Rome"}), calls[0]

