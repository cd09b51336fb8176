"""A daemon with ``server.token``: the client sends ``Authorization: Bearer TOKEN`` on every
request (plain calls, the event stream, lease streams, the attach stream), taken from ``token=``
or ``$VRAMGATE_TOKEN``; without it every call but health is refused with 401."""

from __future__ import annotations

import json
from typing import Callable

import pytest

from conftest import Daemon, fake_config, raw_request
from vramgate import Client, VramgateError

TOKEN = "pytest-s3cret"

CLIP = """
[models.clip]
backend = "external"
vram = "1GiB"
"""


@pytest.fixture
def guarded(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon(lambda sim: CLIP + fake_config(sim, {"fake": 500}), token=TOKEN)


def test_every_kind_of_request_carries_the_token(guarded: Daemon) -> None:
    client = Client(guarded.url, timeout=10, token=TOKEN)
    assert [m["id"] for m in client.status()["models"]] == ["clip", "fake"]
    with client.events(timeout=10) as events:
        assert client.load("fake")["state"] == "ready"
        assert next(events)["type"]
    with client.lease(vram="256MiB", holder="pytest-auth") as lease:
        assert lease.active
        assert [held["id"] for held in client.leases()] == [lease.id]
    with client.attach("clip", on_place=lambda action: None, holder="pytest-auth") as attachment:
        assert attachment.session
    client.unload("fake")


def test_the_token_comes_from_the_environment(guarded: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRAMGATE_TOKEN", TOKEN)
    assert Client(guarded.url, timeout=10).status()["models"]


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_without_the_right_token_every_call_is_refused(
    guarded: Daemon, monkeypatch: pytest.MonkeyPatch, token: "str | None"
) -> None:
    monkeypatch.delenv("VRAMGATE_TOKEN", raising=False)
    client = Client(guarded.url, timeout=10, token=token)
    calls = [
        client.status,
        lambda: client.load("fake"),
        client.events,
        lambda: client.lease(vram="256MiB", holder="refused"),
        lambda: client.attach("clip", on_place=lambda action: None),
    ]
    for call in calls:
        with pytest.raises(VramgateError) as caught:
            call()
        assert caught.value.status == 401
        assert "token" in str(caught.value)
    # Nothing got through: no lease, no attachment, no model loaded.
    status = guarded.client.status()
    assert status["leases"] == []
    assert {m["id"]: m["state"] for m in status["models"]} == {"clip": "unloaded", "fake": "unloaded"}
    # Health stays open, for supervisors.
    code, body = raw_request(f"{guarded.url}/vramgate/health")
    assert code == 200 and json.loads(body)["status"] == "ok"
