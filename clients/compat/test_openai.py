"""The real ``openai`` library (pinned in requirements.txt) against vramgate fronting real
llama-servers: the happy paths an app takes."""

from __future__ import annotations

import base64
import struct
from typing import List

import openai
import pytest

from harness import MAX_TOKENS, MODEL_IDS, N_EMBD, Daemon

MODEL = MODEL_IDS[0]
MESSAGES = [{"role": "user", "content": "hello, say a short answer please"}]


@pytest.fixture
def client(daemon: Daemon) -> openai.OpenAI:
    # No retries: a call that fails must fail here, not be hidden by the library trying again.
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_list_names_both_models(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    for model_id in MODEL_IDS:
        assert model_id in ids, ids


def test_chat_not_streamed(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS)
    assert answer.model == MODEL
    assert len(answer.choices) == 1
    assert answer.choices[0].message.role == "assistant"
    assert isinstance(answer.choices[0].message.content, str)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None
    assert answer.usage.prompt_tokens > 0
    assert answer.usage.completion_tokens == MAX_TOKENS


def test_chat_streamed_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert content_chunks, chunks
    assert all(c.model == MODEL for c in chunks), {c.model for c in chunks}
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"], finishes
    # include_usage: the last chunk has the usage and no choices.
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert chunks[-1].usage.prompt_tokens > 0


def test_completions_not_streamed(client: openai.OpenAI) -> None:
    answer = client.completions.create(model=MODEL, prompt="hello world", max_tokens=MAX_TOKENS)
    assert answer.model == MODEL
    assert isinstance(answer.choices[0].text, str)
    assert answer.usage is not None
    assert answer.usage.completion_tokens == MAX_TOKENS


def test_completions_streamed_with_usage(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL,
        prompt="hello world",
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert any(c.choices and c.choices[0].text for c in chunks), chunks
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_embeddings_float(client: openai.OpenAI) -> None:
    answer = client.embeddings.create(model=MODEL, input=["hello world", "a test"], encoding_format="float")
    assert [item.index for item in answer.data] == [0, 1]
    for item in answer.data:
        assert len(item.embedding) == N_EMBD
        assert all(isinstance(x, float) for x in item.embedding)
    assert answer.data[0].embedding != answer.data[1].embedding


def _decode(encoded: str) -> List[float]:
    raw = base64.b64decode(encoded)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_embeddings_base64_decode_to_the_float_answer(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    encoded = client.embeddings.create(model=MODEL, input="hello world", encoding_format="base64")
    assert isinstance(encoded.data[0].embedding, str), type(encoded.data[0].embedding)
    decoded = _decode(encoded.data[0].embedding)
    assert len(decoded) == N_EMBD
    assert decoded == pytest.approx(floats.data[0].embedding, rel=1e-4, abs=1e-6)


def test_embeddings_library_default_is_decoded(client: openai.OpenAI) -> None:
    # Without encoding_format the library asks for base64 and decodes it itself.
    answer = client.embeddings.create(model=MODEL, input="hello world")
    assert len(answer.data[0].embedding) == N_EMBD
    assert all(isinstance(x, float) for x in answer.data[0].embedding)


def test_models_retrieve_answers_the_model_object(client: openai.OpenAI) -> None:
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "vramgate")
    assert model.created > 0, "the weights file's time, not 0"


def test_an_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=MAX_TOKENS)
    assert "nope" in str(raised.value)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
