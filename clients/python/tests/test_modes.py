"""Modes: ``mode()`` and ``set_mode()``. Skipped while the daemon has no ``/vramgate/mode``."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from conftest import Daemon, fake_config
from vramgate import VramgateError

MODES = """
[modes.one]
gpu = ["a"]
unload = ["b"]

[modes.two]
gpu = ["b"]
unload = ["a"]
"""


@pytest.fixture
def moded(start_daemon: Callable[..., Daemon]) -> Daemon:
    daemon = start_daemon(lambda sim: fake_config(sim, {"a": 1000, "b": 1000}) + MODES)
    daemon.require("GET", "/vramgate/mode")
    return daemon


def test_mode_lists_the_configured_modes(moded: Daemon) -> None:
    answer = moded.client.mode()
    assert answer["mode"] is None
    modes = answer["modes"]
    assert set(modes) == {"one", "two"}
    assert modes["one"]["gpu"] == ["a"]
    assert modes["one"]["unload"] == ["b"]
    assert modes["one"].get("cpu", []) == []
    assert modes["two"]["gpu"] == ["b"]
    assert modes["two"]["unload"] == ["a"]


def test_set_mode_applies_it_and_blocks_until_done(moded: Daemon) -> None:
    client = moded.client
    answer = client.set_mode("one")
    assert answer["mode"] == "one"
    assert isinstance(answer["models"], list)
    assert moded.model("a")["state"] == "ready"
    assert moded.model("b")["state"] == "unloaded"
    assert client.mode()["mode"] == "one"
    assert client.status()["mode"] == "one"

    answer = client.set_mode("two")
    assert answer["mode"] == "two"
    assert moded.model("a")["state"] == "unloaded"
    assert moded.model("b")["state"] == "ready"
    assert client.mode()["mode"] == "two"
    assert client.status()["mode"] == "two"


def test_unknown_mode_is_an_error_naming_it(moded: Daemon) -> None:
    with pytest.raises(VramgateError) as caught:
        moded.client.set_mode("nope")
    assert caught.value.status in (400, 404, 422)
    assert "nope" in caught.value.message
    assert moded.client.mode()["mode"] is None


def test_modes_without_any_configured(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon()
    daemon.require("GET", "/vramgate/mode")
    assert daemon.client.mode() == {"mode": None, "modes": {}}
