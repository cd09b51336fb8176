"""The suite's fixtures (the harness is in harness.py): the llama-server binary (or a skip saying
"missing optional tool"), the synthetic GGUF, and one vramgate daemon for the session with two
process models running the real llama-server."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import pytest

from harness import MODEL_IDS, Daemon, llama_server_args, llama_server_path, make_gguf, process_model_section

# The model on the large GGUF: slow enough that a stream is still running when a test kills it.
LARGE_MODEL = "large"
# The session daemon's model on the tool-calling GGUF (make_gguf.py --tool-calls): it answers
# every request that has tools with one tool call.
TOOLS_MODEL = "tools"


@pytest.fixture(scope="session")
def llama_server() -> Path:
    """The llama-server binary; every test that needs it is skipped when there is none."""
    path = llama_server_path()
    if path is None:
        pytest.skip(
            "missing optional tool: llama-server (run .ci/llama-server.sh to build and cache it, or set LLAMA_SERVER)"
        )
    if not os.access(path, os.X_OK):
        pytest.fail(f"LLAMA_SERVER={path} is not an executable file", pytrace=False)
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small synthetic GGUF, written once for the session."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    make_gguf.write(path, make_gguf.SMALL, seed=0)
    return path


@pytest.fixture(scope="session")
def tools_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small GGUF's tool-calling variant, written once for the session."""
    path = tmp_path_factory.mktemp("gguf-tools") / "tools.gguf"
    make_gguf.write(path, make_gguf.SMALL, seed=0, tool_calls=True)
    return path


@pytest.fixture(scope="session")
def daemon(
    llama_server: Path, tiny_gguf: Path, tools_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    """One daemon for the session, with two process models running the real llama-server on the
    small GGUF, and a third on its tool-calling variant."""
    sections = []
    for model_id in MODEL_IDS:
        cmd = llama_server_args(llama_server, tiny_gguf, "${PORT}", "${MODEL_ID}")
        sections.append(
            f"\n[models.{model_id}]\n"
            'backend = "process"\n'
            f"cmd = [{', '.join(json.dumps(a) for a in cmd)}]\n"
            'health = "/health"\n'
            'vram = "1GiB"\n'
            'ready_timeout = "60s"\n'
            'stop_timeout = "10s"\n'
        )
    sections.append(
        process_model_section(TOOLS_MODEL, llama_server_args(llama_server, tools_gguf, "${PORT}", "${MODEL_ID}"))
    )
    running = Daemon(tmp_path_factory.mktemp("vramgate"), "".join(sections))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def large_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The large synthetic GGUF (52 MB, slow to write), written once for the session."""
    path = tmp_path_factory.mktemp("gguf-large") / "large.gguf"
    make_gguf.write(path, make_gguf.LARGE, seed=0)
    return path


@pytest.fixture(scope="session")
def large_daemon(
    llama_server: Path, large_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    """A daemon of its own with one process model on the large GGUF, for the tests that kill its
    server mid-stream (the session daemon's models stay untouched by them)."""
    cmd = llama_server_args(llama_server, large_gguf, "${PORT}", "${MODEL_ID}")
    # An unload lets a stream run for 2 s (its stop_timeout), then cuts it.
    section = process_model_section(LARGE_MODEL, cmd, stop_timeout="2s")
    running = Daemon(tmp_path_factory.mktemp("vramgate-large"), section)
    yield running
    running.stop()
