"""Fixtures: the real vramgate daemon, built by cargo, on a simulated GPU in a temp dir.

The binaries are ``target/debug/vramgate`` and ``target/debug/vramgate-fake-model`` under the
repository root (``cargo build``); ``VRAMGATE_BIN`` and ``VRAMGATE_FAKE_MODEL`` override them.
Nothing here sleeps in hope: every wait polls a condition against a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from vramgate import Client

REPO = Path(__file__).resolve().parents[3]
STARTUP_DEADLINE = 20.0


def _binary(env: str, name: str) -> Path:
    path = Path(os.environ.get(env) or REPO / "target" / "debug" / name)
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: build it with `cargo build` (or set {env})", pytrace=False)
    return path


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], Any], deadline: float, what: str, interval: float = 0.02) -> Any:
    """Polls ``check`` until it returns something truthy (returned), or fails after
    ``deadline`` seconds naming ``what`` and the last value."""
    end = time.monotonic() + deadline
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline} s waiting for {what}; last value: {last!r}")
        time.sleep(interval)


def raw_request(url: str, method: str = "GET", body: Optional[bytes] = None) -> "tuple[int, bytes]":
    """A request with urllib, for comparing the client with what the daemon really says."""
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Daemon:
    """A running ``vramgate serve`` on a sim device."""

    def __init__(self, tmp: Path, config: str, token: Optional[str] = None) -> None:
        self.dir = tmp
        self.token = token
        self.sim_dir = tmp / "sim"
        (self.sim_dir / "0").mkdir(parents=True, exist_ok=True)
        self.config_path = tmp / "vramgate.toml"
        self.stderr_path = tmp / "stderr.log"
        self.proc: Optional[subprocess.Popen] = None
        last_log = ""
        # A port picked free can be taken before the daemon binds it: try again on another.
        for _ in range(3):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.config_path.write_text(self._full_config(config))
            env = dict(os.environ)
            env["XDG_STATE_HOME"] = str(tmp / "xdg-state")
            env.setdefault("VRAMGATE_LOG", "debug")
            env.pop("VRAMGATE_CONFIG", None)
            # The daemon's token is the test's (in the config), never the user's environment's.
            env.pop("VRAMGATE_TOKEN", None)
            with open(self.stderr_path, "wb") as stderr:
                self.proc = subprocess.Popen(
                    [str(_binary("VRAMGATE_BIN", "vramgate")), "serve", "--config", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    env=env,
                )
            if self._wait_healthy():
                self.client = Client(self.url, timeout=10, token=token)
                return
            last_log = self.log()
            self.stop()
            if "in use" not in last_log.lower():
                break
        pytest.fail(f"vramgate did not become healthy at {self.url}; stderr:\n{last_log}", pytrace=False)

    def _full_config(self, extra: str) -> str:
        return (
            "[server]\n"
            f'listen = "127.0.0.1:{self.port}"\n'
            f'state_dir = "{self.dir / "state"}"\n'
            + (f"token = {json.dumps(self.token)}\n" if self.token is not None else "")
            + "[gpu]\n"
            'probe = "sim"\n'
            'sample_interval = "50ms"\n'
            "[gpu.sim]\n"
            f'dir = "{self.sim_dir}"\n'
            'devices = [{ name = "Sim 8G", total_mib = 8192 }]\n'
            f"{extra}\n"
        )

    def _wait_healthy(self) -> bool:
        end = time.monotonic() + STARTUP_DEADLINE
        assert self.proc is not None
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                return False
            try:
                status, body = raw_request(f"{self.url}/vramgate/health")
                if status == 200 and json.loads(body).get("status") == "ok":
                    return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def log(self) -> str:
        """The daemon's stderr so far."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def sim_claims(self) -> Dict[str, int]:
        """What is claimed on sim device 0: file name (a pid or a consumer) to MiB."""
        claims = {}
        for path in (self.sim_dir / "0").iterdir():
            if path.name.startswith("."):
                continue
            try:
                claims[path.name] = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                continue
        return claims

    def model(self, model_id: str) -> Dict[str, Any]:
        """The model's entry in the status document."""
        for model in self.client.status()["models"]:
            if model["id"] == model_id:
                return model
        raise AssertionError(f"no model {model_id} in status")

    def supports(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> bool:
        """Whether the daemon has a route for ``method path`` (its fallback answers 404 "no
        endpoint at ..." for paths it does not know)."""
        data = json.dumps(body if body is not None else {}).encode() if method != "GET" else None
        status, raw = raw_request(self.url + path, method, data)
        if status != 404:
            return True
        try:
            message = json.loads(raw)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return True
        return not str(message).startswith("no endpoint at")

    def require(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> None:
        """Fails the test when the daemon does not have this endpoint: every route the client
        uses is part of the daemon's API, so a missing one is a regression, never a reason to
        skip (a skip would pass CI unnoticed)."""
        if not self.supports(method, path, body):
            pytest.fail(f"this vramgate has no {method} {path} (404 from the fallback): the client needs it")

    def stop(self) -> None:
        """SIGTERM (so the daemon stops its model servers), then SIGKILL after a deadline."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def fake_model(sim_dir: Path, mib: int, name: str = "fake", extra: str = "") -> str:
    """``cmd`` for a fake model server that claims ``mib`` of simulated VRAM once loaded."""
    fake = _binary("VRAMGATE_FAKE_MODEL", "vramgate-fake-model")
    args: List[str] = [
        str(fake),
        "--port",
        "${PORT}",
        "--sim-dir",
        str(sim_dir),
        "--vram",
        str(mib),
        "--name",
        name,
        "--load-delay",
        "50ms",
        "--quiet",
    ]
    if extra:
        args.extend(extra.split())
    return "[" + ", ".join(json.dumps(a) for a in args) + "]"


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """A factory: ``start_daemon(lambda sim_dir: "[models.x] ...")`` starts a daemon with that
    config appended to the sim base (or with a plain string), and with ``token=...`` as its
    ``server.token`` (the fixture's client sends it); stopped at teardown."""
    started: List[Daemon] = []

    def start(config: "str | Callable[[Path], str]" = "", token: Optional[str] = None) -> Daemon:
        home = tmp_path / f"daemon{len(started)}"
        home.mkdir()
        text = config(home / "sim") if callable(config) else config
        daemon = Daemon(home, text, token)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def fake_config(sim_dir: Path, models: Dict[str, int]) -> str:
    """``[models.ID]`` sections of fake process models claiming the given MiB."""
    sections = []
    for model_id, mib in models.items():
        sections.append(
            f"[models.{model_id}]\n"
            'backend = "process"\n'
            f"cmd = {fake_model(sim_dir, mib, model_id)}\n"
            f'vram = "{mib}MiB"\n'
            'stop_timeout = "2s"\n'
        )
    return "\n".join(sections)


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    """A daemon with one fake process model, ``fake`` (1000 MiB)."""
    return start_daemon(lambda sim: fake_config(sim, {"fake": 1000}))
