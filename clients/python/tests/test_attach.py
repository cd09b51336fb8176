"""External models: ``attach()``. Skipped while the daemon has no attach endpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Callable, List

import pytest

from conftest import Daemon, fake_config, wait_until
from vramgate import VramgateError

CLIP = """
[models.clip]
backend = "external"
vram = "1GiB"
"""

# Seed 001's two modes: CLIP on the GPU with the VLM unloaded, or CLIP on the CPU with the VLM
# loaded.
SEED_MODES = """
[modes.autopilot]
gpu = ["clip"]
unload = ["vlm"]

[modes.recording]
cpu = ["clip"]
gpu = ["vlm"]
"""


def _require_attach(daemon: Daemon) -> None:
    # An unknown model, so that a daemon that has the endpoint answers at once instead of
    # attaching the probe.
    daemon.require("POST", "/vramgate/models/no-such-model/attach", {"pid": os.getpid()})


@pytest.fixture
def clip(start_daemon: Callable[..., Daemon]) -> Daemon:
    daemon = start_daemon(lambda sim: CLIP + fake_config(sim, {"fake": 500}))
    _require_attach(daemon)
    return daemon


class Recorder:
    """An ``on_place`` that records the actions, optionally failing."""

    def __init__(self, fail_with: str = "") -> None:
        self.actions: List[str] = []
        self.fail_with = fail_with
        self.threads: List[str] = []

    def __call__(self, action: str) -> None:
        self.threads.append(threading.current_thread().name)
        self.actions.append(action)
        if self.fail_with:
            raise RuntimeError(self.fail_with)


def test_attach_follows_load_and_unload(clip: Daemon) -> None:
    client = clip.client
    place = Recorder()
    with client.attach("clip", on_place=place, holder="pytest-app") as attachment:
        assert attachment.session
        assert attachment.model == "clip"
        assert attachment.placement is None
        assert not attachment.closed

        entry = client.load("clip")
        assert entry["state"] == "ready"
        assert attachment.wait_for("gpu", 10)
        assert place.actions == ["gpu"]
        assert clip.model("clip")["state"] == "ready"
        # on_place runs on the attachment's thread, not the caller's.
        assert place.threads and place.threads[0] != threading.current_thread().name

        client.unload("clip")
        assert attachment.wait_for("release", 10)
        assert place.actions == ["gpu", "release"]
        assert clip.model("clip")["state"] == "unloaded"
    assert attachment.closed
    assert attachment.error is None


def test_attach_errors_are_raised_at_once(clip: Daemon) -> None:
    client = clip.client
    with pytest.raises(VramgateError) as caught:
        client.attach("no-such-model", on_place=Recorder())
    assert caught.value.status == 404

    with pytest.raises(VramgateError) as caught:
        client.attach("fake", on_place=Recorder())
    assert caught.value.status == 400

    with client.attach("clip", on_place=Recorder()):
        with pytest.raises(VramgateError) as caught:
            client.attach("clip", on_place=Recorder())
        assert caught.value.status == 409

    # Once the first app is gone, another may attach.
    def attach_again() -> bool:
        try:
            client.attach("clip", on_place=Recorder()).close()
            return True
        except VramgateError as e:
            if e.status != 409:
                raise
            return False

    wait_until(attach_again, 5, "the first attachment to be gone")


def test_a_failing_on_place_is_reported_to_the_daemon(clip: Daemon) -> None:
    client = clip.client
    place = Recorder(fail_with="CUDA error: out of memory")
    with client.attach("clip", on_place=place) as attachment:
        with pytest.raises(VramgateError) as caught:
            client.load("clip")
        assert "CUDA error: out of memory" in caught.value.message
        assert place.actions[:1] == ["gpu"]
        assert attachment.placement is None
        wait_until(lambda: clip.model("clip")["state"] != "ready", 5, "clip not to count as ready")


def test_closing_the_attachment_releases_the_model(clip: Daemon) -> None:
    client = clip.client
    attachment = client.attach("clip", on_place=Recorder())
    client.load("clip")
    assert attachment.wait_for("gpu", 10)
    attachment.close()
    assert attachment.closed
    wait_until(lambda: clip.model("clip")["state"] == "unloaded", 5, "clip to be released")


def test_a_killed_app_releases_the_model(clip: Daemon) -> None:
    """The process holding the attachment dies (SIGKILL): the daemon releases what it held."""
    code = (
        "import sys\n"
        "from vramgate import Client\n"
        "a = Client(sys.argv[1]).attach('clip', on_place=lambda act: print(act, flush=True))\n"
        "print('attached', a.session, flush=True)\n"
        "sys.stdin.read()\n"
    )
    app = subprocess.Popen(
        [sys.executable, "-c", code, clip.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert app.stdout is not None
        assert app.stdout.readline().startswith("attached ")
        clip.client.load("clip")
        assert app.stdout.readline().strip() == "gpu"
        assert clip.model("clip")["state"] == "ready"
        os.kill(app.pid, signal.SIGKILL)
        app.wait(10)
        wait_until(lambda: clip.model("clip")["state"] == "unloaded", 5, "clip to be released")
    finally:
        if app.poll() is None:
            app.kill()
            app.wait(10)


def test_seed_001_modes_move_clip_before_loading_the_vlm(start_daemon: Callable[..., Daemon]) -> None:
    """Seed 001's GPUResourceManager: AUTOPILOT (CLIP on GPU, VLM unloaded) and RECORDING
    (CLIP on CPU, VLM loaded), with CLIP moved off the GPU before the VLM loads."""
    daemon = start_daemon(lambda sim: CLIP + fake_config(sim, {"vlm": 5000}) + SEED_MODES)
    _require_attach(daemon)
    daemon.require("GET", "/vramgate/mode")
    client = daemon.client
    vlm_state_when_placed: List[str] = []

    def on_place(action: str) -> None:
        vlm_state_when_placed.append(f"{action}:{daemon.model('vlm')['state']}")

    with client.attach("clip", on_place=on_place):
        assert client.set_mode("autopilot")["mode"] == "autopilot"
        assert daemon.model("clip")["state"] == "ready"
        assert daemon.model("vlm")["state"] == "unloaded"
        assert client.set_mode("recording")["mode"] == "recording"
        assert daemon.model("vlm")["state"] == "ready"
        assert client.status()["mode"] == "recording"
    actions = [entry.split(":")[0] for entry in vlm_state_when_placed]
    assert actions == ["gpu", "cpu"], vlm_state_when_placed
    # When CLIP was told to leave the GPU, the VLM had not started loading yet.
    assert vlm_state_when_placed[1] == "cpu:unloaded", vlm_state_when_placed
