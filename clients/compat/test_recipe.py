"""docs/recipes.md's "llama-server, Ollama and a lease on one card", run as written: the test takes
the toml block under that heading, points its llama-server command and GGUF at the suite's, and its
Ollama URL at vramgate's fake Ollama (Ollama itself cannot run here), starts vramgate with it, and
uses both models through the real libraries and a lease through `vramgate run`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from pathlib import Path
from typing import Iterator, List

import ollama
import openai
import pytest

from harness import DAEMON_DEADLINE, MAX_TOKENS, REPO, Daemon, http, vramgate_path, wait_until

HEADING = "## llama-server, Ollama and a lease on one card"
# What the test replaces in the block; each must be there, so a recipe that changes shape fails
# here rather than being run half-substituted.
LLAMA_SERVER = '"llama-server"'
GGUF = '"/models/qwen2.5-3b-instruct-q4_k_m.gguf"'
OLLAMA_URL = '"http://127.0.0.1:11434"'
OLLAMA_MODEL = "llava:7b"


def recipe_block() -> str:
    """The first ```toml block after the recipe's heading, up to the next heading."""
    text = (REPO / "docs" / "recipes.md").read_text()
    start = text.index(HEADING)
    section = text[start + len(HEADING) :]
    end = section.find("\n## ")
    section = section if end < 0 else section[:end]
    match = re.search(r"^```toml\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    assert match is not None, f"no toml block under {HEADING!r} in docs/recipes.md"
    return match.group(1)


def substitute(block: str, old: str, new: str) -> str:
    assert block.count(old) == 1, f"the recipe's block should hold {old} once:\n{block}"
    return block.replace(old, new)


class FakeOllama:
    """target/debug/vramgate-fake-ollama on a free port, with the recipe's model pulled."""

    def __init__(self, sim_dir: Path) -> None:
        binary = vramgate_path().parent / "vramgate-fake-ollama"
        assert binary.is_file(), f"{binary} is missing: build it with `cargo build`"
        self.proc = subprocess.Popen(
            [str(binary), "--port", "0", "--sim-dir", str(sim_dir), "--model", f"{OLLAMA_MODEL}=3000", "--quiet"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        lines: List[bytes] = []
        assert self.proc.stdout is not None
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(DAEMON_DEADLINE)
        line = lines[0].decode(errors="replace") if lines else ""
        match = re.search(r"listening on (http://\S+)", line)
        if match is None:
            self.stop()
            pytest.fail(f"the fake Ollama printed no address (first line {line!r})")
        self.url = match.group(1)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def recipe_daemon(llama_server: Path, tiny_gguf: Path, tmp_path: Path) -> Iterator[Daemon]:
    # The daemon's sim device directory, made before the daemon so the fake Ollama claims its
    # memory where vramgate measures it.
    sim_dir = tmp_path / "sim"
    (sim_dir / "0").mkdir(parents=True)
    fake = FakeOllama(sim_dir)
    block = recipe_block()
    block = substitute(block, LLAMA_SERVER, json.dumps(str(llama_server)))
    block = substitute(block, GGUF, json.dumps(str(tiny_gguf)))
    block = substitute(block, OLLAMA_URL, json.dumps(fake.url))
    running = Daemon(tmp_path, block)
    yield running
    running.stop()
    fake.stop()


def _leases(daemon: Daemon) -> list:
    status, body = http(f"{daemon.url}/vramgate/leases")
    assert status == 200, body
    document = json.loads(body)
    return document["leases"] if isinstance(document, dict) else document


def test_the_recipe_serves_both_models_and_a_lease(recipe_daemon: Daemon, tmp_path: Path) -> None:
    daemon = recipe_daemon
    chat = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=60)
    answer = chat.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], max_tokens=MAX_TOKENS
    )
    # --alias ${MODEL_ID}: llama-server itself answers under the recipe's name.
    assert answer.model == "chat"
    assert answer.usage is not None and answer.usage.completion_tokens == MAX_TOKENS

    vision = ollama.Client(host=daemon.url, timeout=60)
    reply = vision.chat(model="vision", messages=[{"role": "user", "content": "hello"}], stream=False)
    assert reply.done is True and reply.message.content, reply
    generated = vision.generate(model="vision", prompt="hello", stream=False)
    assert generated.done is True and generated.response, generated
    assert daemon.model("vision")["state"] == "ready", daemon.model("vision")

    # The recipe's lease: `vramgate run --vram ... -- CMD`; CMD (cat) runs until its stdin closes.
    home = tmp_path / "run-home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("VRAMGATE_CONFIG", "VRAMGATE_TOKEN")}
    env.update(VRAMGATE_URL=daemon.url, HOME=str(home), XDG_STATE_HOME=str(home / "state"))
    run = subprocess.Popen(
        [str(vramgate_path()), "run", "--vram", "1G", "--holder", "recipe-job", "--", "cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        held = wait_until(
            lambda: [lease for lease in _leases(daemon) if lease.get("holder") == "recipe-job"],
            DAEMON_DEADLINE,
            "the lease in /vramgate/leases",
        )
        assert held[0]["vram_mib"] == 1024, held
        assert run.poll() is None, "vramgate run ended while its command was still running"
    finally:
        assert run.stdin is not None
        run.stdin.close()
        try:
            code = run.wait(timeout=DAEMON_DEADLINE)
        except subprocess.TimeoutExpired:
            run.kill()
            raise
    stderr = run.stderr.read().decode(errors="replace") if run.stderr else ""
    assert code == 0, f"vramgate run exited {code}: {stderr}"
    wait_until(lambda: _leases(daemon) == [], DAEMON_DEADLINE, "the lease released after the command")
    # Both models are still there: the lease fitted beside them.
    assert (daemon.model("chat")["state"], daemon.model("vision")["state"]) == ("ready", "ready")
