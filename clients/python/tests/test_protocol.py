"""The client's side of the protocols against a scripted stand-in server (no daemon): the attach
stream and its acknowledgements, error bodies, Retry-After. The same client code runs against the
real daemon in the other test files."""

from __future__ import annotations

import json
import os
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from conftest import wait_until
from vramgate import Client, VramgateError


class Script:
    """What the stand-in server does and what it saw."""

    def __init__(self) -> None:
        self.instructions: "queue.Queue[Optional[Dict[str, Any]]]" = queue.Queue()
        self.attach_bodies: List[Dict[str, Any]] = []
        self.acks: List[Dict[str, Any]] = []
        self.mode_bodies: List[Dict[str, Any]] = []
        self.disconnected = threading.Event()
        self.attach_error: Optional[Tuple[int, Dict[str, Any]]] = None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    script: Script

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass

    def _body(self) -> Dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else {}

    def _json(self, status: int, value: Any, headers: Optional[Dict[str, str]] = None) -> None:
        raw = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for name, text in (headers or {}).items():
            self.send_header(name, text)
        self.end_headers()
        self.wfile.write(raw)

    def _chunk(self, line: Dict[str, Any]) -> None:
        data = (json.dumps(line) + "\n").encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/vramgate/mode":
            self._json(
                200, {"mode": None, "modes": {"autopilot": {"gpu": ["clip"], "cpu": [], "unload": ["vlm"]}}}
            )
        elif self.path == "/vramgate/status":
            self._json(503, {"error": {"message": "busy, come back", "code": 503}}, {"Retry-After": "7"})
        elif self.path == "/vramgate/health":
            raw = b"upstream exploded"
            self.send_response(502)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        else:
            self._json(404, {"error": {"message": f"no endpoint at {self.path}", "code": 404}})

    def do_POST(self) -> None:  # noqa: N802
        script = self.script
        body = self._body()
        if self.path == "/vramgate/mode":
            script.mode_bodies.append(body)
            self._json(200, {"mode": body.get("mode"), "models": []})
        elif self.path == "/vramgate/models/clip/ack":
            script.acks.append(body)
            self._json(200, {"ok": True})
        elif self.path == "/vramgate/models/clip/attach":
            script.attach_bodies.append(body)
            if script.attach_error is not None:
                self._json(*script.attach_error)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                self._chunk({"event": "attached", "session": "s-1", "model": "clip"})
                while True:
                    try:
                        item = script.instructions.get(timeout=0.05)
                    except queue.Empty:
                        self._chunk({"event": "held"})
                        continue
                    if item is None:  # end the stream from the server's side
                        self.wfile.write(b"0\r\n\r\n")
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    self._chunk(item)
            except OSError:
                script.disconnected.set()
                self.close_connection = True
        else:
            self._json(404, {"error": {"message": f"no endpoint at {self.path}", "code": 404}})


@pytest.fixture
def stand_in() -> Iterator[Tuple[Client, Script]]:
    script = Script()
    handler = type("ScriptedHandler", (Handler,), {"script": script})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield Client(f"http://127.0.0.1:{server.server_address[1]}", timeout=5), script
    finally:
        server.shutdown()
        server.server_close()


def instruction(seq: int, action: str) -> Dict[str, Any]:
    return {"event": "instruction", "seq": seq, "action": action}


def test_attach_places_and_acknowledges(stand_in: Tuple[Client, Script]) -> None:
    client, script = stand_in
    seen: List[str] = []
    with client.attach("clip", on_place=seen.append, holder="my-app") as attachment:
        assert script.attach_bodies == [{"pid": os.getpid(), "holder": "my-app"}]
        assert attachment.session == "s-1"
        assert attachment.placement is None
        script.instructions.put(instruction(1, "gpu"))
        wait_until(lambda: script.acks, 5, "the first ack")
        assert script.acks == [{"session": "s-1", "seq": 1, "ok": True}]
        assert attachment.placement == "gpu"
        script.instructions.put(instruction(2, "cpu"))
        script.instructions.put(instruction(3, "release"))
        wait_until(lambda: len(script.acks) == 3, 5, "three acks")
        assert [a["seq"] for a in script.acks] == [1, 2, 3]
        assert seen == ["gpu", "cpu", "release"]
        assert attachment.placement == "release"
    assert attachment.closed
    assert attachment.error is None
    # The server sees the connection gone at its next write.
    wait_until(script.disconnected.is_set, 5, "the server to see the disconnect")


def test_attach_reports_a_failing_on_place(stand_in: Tuple[Client, Script]) -> None:
    client, script = stand_in

    def on_place(action: str) -> None:
        if action == "gpu":
            raise RuntimeError("CUDA error: out of memory")

    with client.attach("clip", on_place=on_place, pid=4242) as attachment:
        assert script.attach_bodies == [{"pid": 4242}]
        script.instructions.put(instruction(1, "gpu"))
        script.instructions.put(instruction(2, "cpu"))
        wait_until(lambda: len(script.acks) == 2, 5, "two acks")
        assert script.acks[0] == {
            "session": "s-1",
            "seq": 1,
            "ok": False,
            "error": "CUDA error: out of memory",
        }
        assert script.acks[1] == {"session": "s-1", "seq": 2, "ok": True}
        assert attachment.placement == "cpu"


def test_attach_close_from_on_place(stand_in: Tuple[Client, Script]) -> None:
    client, script = stand_in
    holder: Dict[str, Any] = {}

    def on_place(action: str) -> None:
        holder["attachment"].close()

    holder["attachment"] = attachment = client.attach("clip", on_place=on_place)
    script.instructions.put(instruction(1, "release"))
    wait_until(lambda: attachment.closed, 5, "the attachment to close")
    wait_until(script.disconnected.is_set, 5, "the server to see the disconnect")
    attachment.close()


def test_attach_ended_by_the_server(stand_in: Tuple[Client, Script]) -> None:
    client, script = stand_in
    attachment = client.attach("clip", on_place=lambda action: None)
    script.instructions.put(None)
    wait_until(lambda: attachment.closed, 5, "the attachment to end")
    assert isinstance(attachment.error, VramgateError)
    attachment.close()


@pytest.mark.parametrize(
    "status, message",
    [
        (404, "unknown model clip"),
        (400, 'clip is not an external model (backend = "process")'),
        (409, "clip is already attached by pid 77 (my-other-app)"),
    ],
)
def test_attach_errors_before_the_stream(stand_in: Tuple[Client, Script], status: int, message: str) -> None:
    client, script = stand_in
    script.attach_error = (status, {"error": {"message": message, "code": status}})
    with pytest.raises(VramgateError) as caught:
        client.attach("clip", on_place=lambda action: None)
    assert caught.value.status == status
    assert caught.value.message == message
    assert caught.value.code == status


def test_mode_and_set_mode(stand_in: Tuple[Client, Script]) -> None:
    client, script = stand_in
    assert client.mode()["modes"]["autopilot"]["gpu"] == ["clip"]
    assert client.set_mode("autopilot") == {"mode": "autopilot", "models": []}
    assert script.mode_bodies == [{"mode": "autopilot"}]


def test_retry_after_and_error_codes(stand_in: Tuple[Client, Script]) -> None:
    client, _ = stand_in
    with pytest.raises(VramgateError) as caught:
        client.status()
    assert caught.value.status == 503
    assert caught.value.message == "busy, come back"
    assert caught.value.retry_after == 7.0
    assert caught.value.code == 503


def test_an_error_that_is_not_json_keeps_its_text(stand_in: Tuple[Client, Script]) -> None:
    client, _ = stand_in
    with pytest.raises(VramgateError) as caught:
        client.health()
    assert caught.value.status == 502
    assert caught.value.message == "upstream exploded"
    assert caught.value.retry_after is None
