"""The real ``ollama`` library (pinned in requirements.txt) against vramgate fronting real
llama-servers: the happy paths an app takes."""

from __future__ import annotations

import ollama
import pytest

from harness import MAX_TOKENS, MODEL_IDS, N_EMBD, Daemon, wait_until

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


def test_show_describes_the_model_from_its_weights(client: ollama.Client) -> None:
    answer = client.show(MODEL)
    assert answer.details is not None and answer.details.format == "gguf", answer
    assert answer.modelinfo is not None and answer.modelinfo.get("general.architecture") == "llama", answer


def test_an_unknown_model_is_a_response_error_with_a_string(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as raised:
        client.chat(model="nope", messages=MESSAGES, options=OPTIONS, stream=False)
    assert raised.value.status_code == 404
    assert isinstance(raised.value.error, str) and "nope" in raised.value.error


def test_pull_says_vramgate_does_not_download_models(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as raised:
        client.pull(MODEL)
    assert raised.value.status_code == 501
    assert isinstance(raised.value.error, str) and "does not download" in raised.value.error


def test_embeddings_the_older_call(client: ollama.Client) -> None:
    answer = client.embeddings(model=MODEL, prompt="hello world")
    assert len(answer.embedding) == N_EMBD


def test_keep_alive_loads_and_unloads(client: ollama.Client) -> None:
    other = MODEL_IDS[1]

    def loaded() -> list:
        return [model.model for model in client.ps().models]

    # A generate without a prompt loads the model; with keep_alive 0 it unloads it.
    client.generate(model=other, prompt="", stream=False)
    assert any(name in (other, f"{other}:latest") for name in loaded()), loaded()
    client.generate(model=other, prompt="", keep_alive=0, stream=False)
    wait_until(
        lambda: all(name not in (other, f"{other}:latest") for name in loaded()),
        deadline=30.0,
        what=f"{other} gone from ps after keep_alive 0",
    )
