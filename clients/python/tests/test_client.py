"""The client against the real daemon: status, load/unload, errors, leases, events."""

from __future__ import annotations

import json
import threading

import pytest

from conftest import Daemon, fake_config, free_port, raw_request, wait_until
from vramgate import DEFAULT_URL, Client, DaemonUnreachable, VramgateError


def test_status_has_the_contract_shape(daemon: Daemon) -> None:
    status = daemon.client.status()
    for key in ("devices", "degraded", "degraded_reasons", "models", "leases", "mode"):
        assert key in status, key
    assert status["degraded"] is False
    [device] = status["devices"]
    assert device["index"] == 0
    assert device["name"] == "Sim 8G"
    assert device["probe"] == "sim"
    assert device["total_mib"] == 8192
    for key in (
        "used_mib",
        "free_mib",
        "usable_mib",
        "level",
        "utilization_pct",
        "temperature_c",
        "processes",
    ):
        assert key in device, key
    assert device["level"] in ("ok", "warning", "critical", "emergency")
    [model] = status["models"]
    assert model["id"] == "fake"
    assert model["backend"] == "process"
    assert model["state"] == "unloaded"
    assert status["leases"] == []
    assert daemon.client.health()["status"] == "ok"


def test_load_then_unload_a_process_model(daemon: Daemon) -> None:
    client = daemon.client
    entry = client.load("fake")
    assert entry["id"] == "fake"
    assert entry["state"] == "ready"
    assert daemon.model("fake")["state"] == "ready"
    # The fake server claims its simulated VRAM under its pid.
    claims = wait_until(
        lambda: {k: v for k, v in daemon.sim_claims().items() if v == 1000}, 10, "the sim claim"
    )
    [pid] = claims
    assert pid.isdigit()
    wait_until(
        lambda: any(
            p["pid"] == int(pid) and p["model"] == "fake" for p in client.status()["devices"][0]["processes"]
        ),
        10,
        "the model's process in status",
    )

    entry = client.unload("fake")
    assert entry["state"] == "unloaded"
    assert daemon.model("fake")["state"] == "unloaded"
    wait_until(lambda: pid not in daemon.sim_claims(), 10, "the sim claim to go")


def test_unknown_model_carries_the_daemons_message_and_status(daemon: Daemon) -> None:
    with pytest.raises(VramgateError) as caught:
        daemon.client.load("no-such-model")
    error = caught.value
    assert error.status == 404
    status, raw = raw_request(f"{daemon.url}/vramgate/models/no-such-model/load", "POST", b"")
    assert status == 404
    assert error.message == json.loads(raw)["error"]["message"]
    assert str(error) == error.message
    assert "no-such-model" in error.message
    assert not isinstance(error, DaemonUnreachable)


def test_an_odd_model_name_is_one_path_segment(daemon: Daemon) -> None:
    with pytest.raises(VramgateError) as caught:
        daemon.client.unload("a/b c")
    assert caught.value.status == 404


def test_no_daemon_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    client = Client(url, timeout=5)
    with pytest.raises(DaemonUnreachable) as caught:
        client.status()
    error = caught.value
    assert isinstance(error, VramgateError)
    assert isinstance(error, ConnectionError)
    assert error.status is None
    assert url in str(error)
    assert "not reachable" in str(error)
    with pytest.raises(DaemonUnreachable):
        client.lease(vram="1GiB")
    with pytest.raises(DaemonUnreachable):
        client.events()


def test_url_defaults_like_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VRAMGATE_URL", raising=False)
    assert Client().url == DEFAULT_URL == "http://127.0.0.1:9777"
    monkeypatch.setenv("VRAMGATE_URL", "http://127.0.0.1:1234/")
    assert Client().url == "http://127.0.0.1:1234"
    assert Client("http://localhost:5").url == "http://localhost:5"
    with pytest.raises(ValueError):
        Client("localhost:9777")


def test_lease_is_held_for_the_block(daemon: Daemon) -> None:
    client = daemon.client
    with client.lease(vram="2GiB", holder="pytest-ffmpeg") as lease:
        assert lease.vram_mib == 2048
        assert lease.device == 0
        assert lease.id
        assert lease.holder == "pytest-ffmpeg"
        assert lease.exclusive is False
        assert lease.active
        [held] = client.status()["leases"]
        assert held["id"] == lease.id
        assert held["holder"] == "pytest-ffmpeg"
        assert held["vram_mib"] == 2048
        # The stream is read in the background: heartbeats keep coming, the lease stays.
        wait_until(lambda: lease.heartbeats >= 3, 10, "three heartbeats")
        assert [l["id"] for l in client.status()["leases"]] == [lease.id]
    assert not lease.active
    assert lease.error is None
    wait_until(lambda: client.status()["leases"] == [], 2, "the lease to be released")


def test_lease_release_without_a_block(daemon: Daemon) -> None:
    client = daemon.client
    lease = client.lease(vram=512, holder="plain", wait="5s", priority=60, device=0)
    assert lease.vram_mib == 512
    assert [l["id"] for l in client.leases()] == [lease.id]
    lease.release()
    lease.release()  # idempotent
    wait_until(lambda: client.leases() == [], 2, "the lease to be released")


def test_lease_that_never_fits_fails_at_once(daemon: Daemon) -> None:
    with pytest.raises(VramgateError) as caught:
        daemon.client.lease(vram="100GiB", holder="too-big")
    assert caught.value.status == 422
    assert "usable" in caught.value.message
    assert daemon.client.status()["leases"] == []


def test_exclusive_lease_keeps_others_out(daemon: Daemon) -> None:
    client = daemon.client
    with client.lease(vram="1GiB", holder="gpu-lock", exclusive=True) as lock:
        assert lock.exclusive
        with pytest.raises(VramgateError) as caught:
            client.lease(vram="1GiB", holder="second", wait=0)
        assert caught.value.status == 503
    wait_until(lambda: client.status()["leases"] == [], 2, "the exclusive lease to be released")
    with client.lease(vram="1GiB", holder="second", wait=0):
        pass


def test_model_lease_keeps_the_model_in_use(daemon: Daemon) -> None:
    client = daemon.client
    with client.lease(model="fake", holder="user") as lease:
        assert lease.model == "fake"
        assert lease.upstream and lease.upstream.startswith("http://")
        entry = daemon.model("fake")
        assert entry["state"] == "ready"
        assert entry["in_use"] >= 1
    wait_until(lambda: daemon.model("fake")["in_use"] == 0, 2, "the model to be out of use")
    with pytest.raises(ValueError):
        client.lease()
    with pytest.raises(ValueError):
        client.lease(vram="1G", model="fake")


def test_events_see_the_model_state_changes_of_a_load(daemon: Daemon) -> None:
    client = daemon.client
    with client.events(timeout=20) as events:
        client.load("fake")
        seen = []
        for event in events:
            seen.append(event)
            assert {"seq", "time", "type"} <= set(event)
            if event["type"] == "model_state" and event["model"] == "fake" and event["to"] == "ready":
                break
        states = [(e["from"], e["to"]) for e in seen if e["type"] == "model_state"]
        assert ("loading", "ready") in states, seen
        assert events.last_id is not None
    assert events.closed


def test_breaking_out_of_events_closes_the_stream(daemon: Daemon) -> None:
    client = daemon.client
    stream = client.events(timeout=20)
    loader = threading.Thread(target=client.load, args=("fake",))
    loader.start()
    for event in stream:
        if event["type"] == "model_state":
            break
    stream.close()
    assert stream.closed
    assert list(stream) == []
    loader.join(20)
    # The daemon still serves, and a new stream works.
    with client.events(timeout=20) as again:
        client.unload("fake")
        assert any(e["type"] == "model_state" for e in _take_until_unloaded(again))


def _take_until_unloaded(events):  # type: ignore[no-untyped-def]
    for event in events:
        yield event
        if event["type"] == "model_state" and event["to"] == "unloaded":
            return


def test_two_daemons_two_clients(start_daemon) -> None:  # type: ignore[no-untyped-def]
    one = start_daemon(lambda sim: fake_config(sim, {"a": 500}))
    two = start_daemon(lambda sim: fake_config(sim, {"b": 500}))
    assert [m["id"] for m in one.client.models()] == ["a"]
    assert [m["id"] for m in two.client.models()] == ["b"]


def test_a_silent_event_stream_times_out(daemon: Daemon) -> None:
    stream = daemon.client.events(timeout=0.3)
    with pytest.raises(TimeoutError):
        next(stream)
    assert stream.closed
    assert list(stream) == []
