"""Lifecycle through the real client libraries, each test on a daemon of its own: a swap between
two real llama-servers on a simulated GPU that holds only one, and a model server killed while
idle."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import ollama
import openai
import pytest

from harness import DAEMON_DEADLINE, MAX_TOKENS, Daemon, kill_model_server, llama_server_args, process_model_section, wait_until

MESSAGES = [{"role": "user", "content": "hello"}]


def _openai(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def one_slot_daemon(llama_server: Path, tiny_gguf: Path, tmp_path: Path) -> Iterator[Daemon]:
    """Two 1 GiB models on a 2 GiB GPU (1.5 GiB usable after the 512 MiB reserve): one at a time."""
    sections = "".join(
        process_model_section(model_id, llama_server_args(llama_server, tiny_gguf, "${PORT}", "${MODEL_ID}"))
        for model_id in ("first", "second")
    )
    running = Daemon(tmp_path, sections, total_mib=2048)
    yield running
    running.stop()


def test_asking_the_second_model_evicts_the_first(one_slot_daemon: Daemon) -> None:
    daemon = one_slot_daemon
    answer = _openai(daemon).chat.completions.create(model="first", messages=MESSAGES, max_tokens=MAX_TOKENS)
    assert answer.usage is not None and answer.usage.completion_tokens == MAX_TOKENS
    assert (daemon.model("first")["state"], daemon.model("second")["state"]) == ("ready", "unloaded")
    first_pid = daemon.model("first")["pid"]

    reply = ollama.Client(host=daemon.url, timeout=60).chat(
        model="second", messages=MESSAGES, options={"num_predict": MAX_TOKENS}, stream=False
    )
    assert reply.eval_count == MAX_TOKENS, reply
    first, second = daemon.model("first"), daemon.model("second")
    assert (first["state"], first["pid"]) == ("unloaded", None), first
    assert second["state"] == "ready" and isinstance(second["pid"], int), second
    assert second["pid"] != first_pid

    # And back: the first is loaded again in place of the second.
    again = _openai(daemon).chat.completions.create(model="first", messages=MESSAGES, max_tokens=MAX_TOKENS)
    assert again.usage is not None and again.usage.completion_tokens == MAX_TOKENS
    assert (daemon.model("first")["state"], daemon.model("second")["state"]) == ("ready", "unloaded")


def test_an_idle_server_killed_is_restarted_and_the_crash_recorded(
    llama_server: Path, tiny_gguf: Path, tmp_path: Path
) -> None:
    cmd = llama_server_args(llama_server, tiny_gguf, "${PORT}", "${MODEL_ID}")
    daemon = Daemon(tmp_path, process_model_section("idle", cmd))
    try:
        client = _openai(daemon)
        client.chat.completions.create(model="idle", messages=MESSAGES, max_tokens=MAX_TOKENS)
        pid = kill_model_server(daemon, "idle")
        # vramgate sees the exit of its child and records it.
        crashed = wait_until(
            lambda: (lambda m: m if m["failures"] >= 1 else None)(daemon.model("idle")),
            DAEMON_DEADLINE,
            "the crash in the status",
        )
        assert crashed["last_error"], crashed
        assert crashed["pid"] != pid, crashed

        answer = client.chat.completions.create(model="idle", messages=MESSAGES, max_tokens=MAX_TOKENS)
        assert answer.usage is not None and answer.usage.completion_tokens == MAX_TOKENS
        restarted = daemon.model("idle")
        assert restarted["state"] == "ready" and restarted["pid"] not in (None, pid), restarted
    finally:
        daemon.stop()
