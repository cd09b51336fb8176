"""The real ``ollama`` library (pinned in requirements.txt) against vramgate fronting real
llama-servers: the happy paths an app takes."""

from __future__ import annotations

import ollama
import pytest

from harness import MAX_TOKENS, MODEL_IDS, N_EMBD, Daemon

MODEL = MODEL_IDS[0]
MESSAGES = [{"role": "user", "content": "hello, say a short answer please"}]
OPTIONS = {"num_predict": MAX_TOKENS}


@pytest.fixture
def client(daemon: Daemon) -> ollama.Client:
    return ollama.Client(host=daemon.url, timeout=60)


def test_list_names_both_models(client: ollama.Client) -> None:
    names = [model.model for model in client.list().models]
    for model_id in MODEL_IDS:
        assert any(name in (model_id, f"{model_id}:latest") for name in names), names


def test_ps_shows_a_loaded_model(client: ollama.Client, daemon: Daemon) -> None:
    daemon.load(MODEL)
    loaded = [model.model for model in client.ps().models]
    assert any(name in (MODEL, f"{MODEL}:latest") for name in loaded), loaded


def test_ps_omits_an_unloaded_model(client: ollama.Client, daemon: Daemon) -> None:
    other = MODEL_IDS[1]
    daemon.unload(other)
    loaded = [model.model for model in client.ps().models]
    assert all(name not in (other, f"{other}:latest") for name in loaded), loaded


def test_chat_not_streamed(client: ollama.Client) -> None:
    answer = client.chat(model=MODEL, messages=MESSAGES, options=OPTIONS, stream=False)
    assert answer.done is True
    assert answer.message.role == "assistant"
    assert isinstance(answer.message.content, str)
    assert answer.done_reason == "length"
    assert answer.prompt_eval_count and answer.prompt_eval_count > 0
    assert answer.eval_count == MAX_TOKENS


def test_chat_streamed(client: ollama.Client) -> None:
    parts = list(client.chat(model=MODEL, messages=MESSAGES, options=OPTIONS, stream=True))
    assert len(parts) >= 2, parts
    assert all(part.done is False for part in parts[:-1])
    assert parts[-1].done is True
    assert parts[-1].done_reason == "length"
    assert parts[-1].eval_count == MAX_TOKENS
    assert "".join(part.message.content or "" for part in parts[:-1]), parts


def test_generate_not_streamed(client: ollama.Client) -> None:
    answer = client.generate(model=MODEL, prompt="hello world", options=OPTIONS, stream=False)
    assert answer.done is True
    assert isinstance(answer.response, str)
    assert answer.eval_count == MAX_TOKENS


def test_generate_streamed(client: ollama.Client) -> None:
    parts = list(client.generate(model=MODEL, prompt="hello world", options=OPTIONS, stream=True))
    assert len(parts) >= 2, parts
    assert parts[-1].done is True
    assert all(part.done is False for part in parts[:-1])
    assert "".join(part.response for part in parts[:-1]), parts


def test_embed(client: ollama.Client) -> None:
    answer = client.embed(model=MODEL, input=["hello world", "a test"])
    assert len(answer.embeddings) == 2
    assert all(len(vector) == N_EMBD for vector in answer.embeddings)
    assert answer.embeddings[0] != answer.embeddings[1]
