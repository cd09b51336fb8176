"""Lifecycle through the real client libraries, each test on a daemon of its own: a swap between
two real llama-servers on a simulated GPU that holds only one, a model server killed while
idle, and an unload while a stream is in flight."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Iterator, List

import ollama
import openai
import pytest

from conftest import LARGE_MODEL
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


def test_an_unload_with_a_stream_in_flight_cuts_it_and_the_server_exits_at_once(large_daemon: Daemon) -> None:
    """llama-server does not exit on SIGTERM while it answers a request, only once its clients
    have gone: an unload lets the stream run for the model's stop_timeout (2 s here), then cuts it
    (the client gets an error vramgate wrote into the stream) and closes the connection, and the
    server exits at once rather than after a second stop_timeout and a SIGKILL."""
    client = _openai(large_daemon)
    stream = client.chat.completions.create(model=LARGE_MODEL, messages=MESSAGES, max_tokens=900, stream=True)
    chunks = iter(stream)
    # The first token: the server is generating (900 tokens take it over ten seconds).
    first = next((c for c in chunks if c.choices and c.choices[0].delta.content), None)
    assert first is not None, "the stream ended without a token"
    pid = large_daemon.model(LARGE_MODEL)["pid"]
    unloaded: List[float] = []
    unloading = threading.Thread(target=lambda: (large_daemon.unload(LARGE_MODEL), unloaded.append(time.monotonic())))
    asked = time.monotonic()
    unloading.start()
    tokens_after = 0
    with pytest.raises(openai.APIError) as raised:
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                tokens_after += 1
    cut = time.monotonic()
    stream.close()
    unloading.join(DAEMON_DEADLINE)
    assert unloaded, f"the unload did not finish; log:\n{large_daemon.log()}"
    assert not isinstance(raised.value, openai.APIConnectionError), repr(raised.value)
    assert "was stopped" in str(raised.value), str(raised.value)
    assert tokens_after > 0, "the answer ran on until the cut"
    assert cut - asked < 2 + 3, f"cut {cut - asked:.2f} s after the unload (stop_timeout 2 s)"
    stopped = unloaded[0] - cut
    assert stopped < 1.0, f"the server stopped {stopped:.2f} s after the cut; log:\n{large_daemon.log()}"
    assert "did not stop within" not in large_daemon.log(), "the server had to be killed"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    print(f"unload with a stream in flight: cut {cut - asked:.2f} s after the unload, server gone {stopped:.3f} s after the cut")
