"""The harness: the real vramgate daemon on a simulated GPU, fronting real llama-servers that serve a
synthetic GGUF (make_gguf.py), for the real openai and ollama client libraries.

Binaries: ``VRAMGATE_BIN`` (default ``target/debug/vramgate``, from ``cargo build``) and
``LLAMA_SERVER`` (default: the cache ``.ci/llama-server.sh`` fills). Without a llama-server every
test is skipped with a reason that says "missing optional tool"; a missing vramgate fails.
Every daemon gets its own temp dir (state, HOME, XDG dirs) and an ephemeral port, read from the
line it prints; nothing here sleeps in hope: every wait polls a condition against a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import make_gguf  # noqa: E402  (beside this file, found through the path above)

# Generous: a cold llama-server on a loaded CI machine; each wait ends as soon as its condition
# holds, so a fast machine never waits this long.
DAEMON_DEADLINE = 30.0
# The two process models the suite's daemon serves, both on the small GGUF.
MODEL_IDS = ("tiny", "tiny2")
# Every answer's length: the synthetic model never ends a turn by itself, so it is exact.
MAX_TOKENS = 8
# The small GGUF's embedding width (what /v1/embeddings returns per input).
N_EMBD = make_gguf.SMALL.n_embd


def llama_cpp_python_version() -> str:
    """The version .ci/llama-server.sh pins (its cache key), read from the script itself so the
    two never disagree."""
    script = (REPO / ".ci" / "llama-server.sh").read_text()
    match = re.search(r"^llama_cpp_python_version=(\S+)$", script, re.MULTILINE)
    if match is None:
        raise RuntimeError(".ci/llama-server.sh has no llama_cpp_python_version= line")
    return match.group(1)


def llama_server_path() -> Optional[Path]:
    """``LLAMA_SERVER`` if set, else the binary in .ci/llama-server.sh's cache, if built."""
    explicit = os.environ.get("LLAMA_SERVER")
    if explicit:
        return Path(explicit)
    cache_root = os.environ.get("VRAMGATE_CI_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vramgate-ci"
    )
    cached = Path(cache_root) / f"llama-server-{llama_cpp_python_version()}" / "llama-server"
    return cached if cached.is_file() else None


def vramgate_path() -> Path:
    path = Path(os.environ.get("VRAMGATE_BIN") or REPO / "target" / "debug" / "vramgate")
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: build it with `cargo build` (or set VRAMGATE_BIN)", pytrace=False)
    return path


def wait_until(check: Callable[[], Any], deadline: float, what: str, interval: float = 0.02) -> Any:
    """Polls ``check`` until it returns something truthy (returned), or fails after ``deadline``
    seconds naming ``what`` and the last value."""
    end = time.monotonic() + deadline
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline} s waiting for {what}; last value: {last!r}")
        time.sleep(interval)


def http(
    url: str, method: str = "GET", body: Optional[Dict[str, Any]] = None, timeout: float = 30
) -> Tuple[int, bytes]:
    """One request with urllib: (status, body); connection errors raise OSError."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def llama_server_args(binary: Path, gguf: Path, port: str, alias: str) -> List[str]:
    """The llama-server command line the suite uses, behind vramgate or on its own: one server
    answers chat, completions and embeddings (mean pooling), on one thread and a small context so
    two fit on a CI machine."""
    return [
        str(binary),
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--alias",
        alias,
        "--ctx-size",
        "1024",
        "--threads",
        "1",
        "--embeddings",
        "--pooling",
        "mean",
    ]


def process_model_section(model_id: str, cmd: List[str], vram: str = "1GiB", stop_timeout: str = "10s") -> str:
    """A [models.ID] table for a process model running ``cmd`` (a llama-server command line);
    ``stop_timeout``: how long an unload lets answers in flight run before it cuts them."""
    return (
        f"\n[models.{model_id}]\n"
        'backend = "process"\n'
        f"cmd = [{', '.join(json.dumps(a) for a in cmd)}]\n"
        'health = "/health"\n'
        f'vram = "{vram}"\n'
        'ready_timeout = "60s"\n'
        f'stop_timeout = "{stop_timeout}"\n'
    )


class Daemon:
    """A running ``vramgate serve --listen 127.0.0.1:0`` on a sim device."""

    def __init__(self, home: Path, models_config: str, total_mib: int = 8192) -> None:
        """``models_config`` is TOML appended after the daemon's own [server] and [gpu] tables (so
        it may hold [models.*], [scheduler], [aliases], ...); ``total_mib`` is the size of the one
        simulated GPU (usable: that less gpu.reserve_mib, 512 by default)."""
        self.home = home
        sim_dir = home / "sim"
        (sim_dir / "0").mkdir(parents=True, exist_ok=True)
        self.config_path = home / "vramgate.toml"
        self.config_path.write_text(
            "[server]\n"
            f'state_dir = "{home / "state"}"\n'
            "[gpu]\n"
            'probe = "sim"\n'
            'sample_interval = "50ms"\n'
            "[gpu.sim]\n"
            f'dir = "{sim_dir}"\n'
            f'devices = [{{ name = "Sim", total_mib = {total_mib} }}]\n' + models_config
        )
        self.stderr_path = home / "vramgate.log"
        env = dict(os.environ)
        # Hermetic: no user's config, token, URL, state or home reaches this daemon.
        for name in ("VRAMGATE_CONFIG", "VRAMGATE_TOKEN", "VRAMGATE_URL"):
            env.pop(name, None)
        env["HOME"] = str(home)
        env["XDG_STATE_HOME"] = str(home / "xdg-state")
        env.setdefault("VRAMGATE_LOG", "info")
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [str(vramgate_path()), "serve", "--config", str(self.config_path), "--listen", "127.0.0.1:0"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
            )
        self.url = self._read_address()

    def _read_address(self) -> str:
        """The address from the daemon's first stdout line, "vramgate V listening on URL"; read on
        a thread so a daemon that never prints fails at the deadline instead of hanging."""
        assert self.proc.stdout is not None
        lines: List[bytes] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(DAEMON_DEADLINE)
        line = lines[0].decode(errors="replace") if lines else ""
        match = re.search(r"listening on (http://\S+)", line)
        if match is None:
            self.stop()
            pytest.fail(
                f"vramgate printed no address (first line {line!r}); its log:\n{self.log()}", pytrace=False
            )
        return match.group(1)

    def log(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def model(self, model_id: str) -> Dict[str, Any]:
        """The model's entry in the status document."""
        status, body = http(f"{self.url}/vramgate/models")
        assert status == 200, body
        document = json.loads(body)
        models = document["models"] if isinstance(document, dict) else document
        for model in models:
            if model["id"] == model_id:
                return model
        raise AssertionError(f"no model {model_id} in {document}")

    def unload(self, model_id: str) -> None:
        status, body = http(f"{self.url}/vramgate/models/{model_id}/unload", "POST", {})
        assert status == 200, f"unload {model_id}: {status} {body!r}"

    def load(self, model_id: str) -> None:
        status, body = http(
            f"{self.url}/vramgate/models/{model_id}/load", "POST", {}, timeout=DAEMON_DEADLINE
        )
        assert status == 200, f"load {model_id}: {status} {body!r}\n{self.log()}"

    def models(self) -> List[Dict[str, Any]]:
        """Every model's entry in the status document."""
        status, body = http(f"{self.url}/vramgate/models")
        assert status == 200, body
        document = json.loads(body)
        return document["models"] if isinstance(document, dict) else document

    def stop(self) -> None:
        """SIGTERM (so the daemon stops its model servers), then SIGKILL after a deadline."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def kill_model_server(daemon: Daemon, model_id: str) -> int:
    """SIGKILL to the model's server process, by the pid the status document shows; returns it."""
    pid = daemon.model(model_id)["pid"]
    assert isinstance(pid, int) and pid > 0, daemon.model(model_id)
    os.kill(pid, signal.SIGKILL)
    return pid
