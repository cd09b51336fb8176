"""The client for one vramgate daemon."""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, Dict, List, Optional, Union
from urllib.parse import quote

from ._http import Endpoint, Timeout, open_request, parse_line, request_json
from .errors import VramgateError
from .streams import Attachment, EventStream, Lease

__all__ = ["Client", "DEFAULT_URL"]

#: The daemon's default address (the CLI's default ``--url``).
DEFAULT_URL = "http://127.0.0.1:9777"

PREFIX = "/vramgate"

Size = Union[str, int, float]
Duration = Union[str, int, float]


class _Default:
    """The type of "use the client's timeout"."""


_DEFAULT = _Default()


def _segment(name: str) -> str:
    """A model id as one URL path segment."""
    return quote(str(name), safe="")


def _duration(value: Duration) -> Union[str, int]:
    """A duration for the daemon: strings as given (``"60s"``, ``"500ms"``), whole numbers as
    seconds, fractions as milliseconds."""
    if isinstance(value, bool):
        raise TypeError("a duration must be a string like '60s' or a number of seconds")
    if isinstance(value, str):
        return value
    if isinstance(value, int) or float(value).is_integer():
        return int(value)
    return f"{round(float(value) * 1000)}ms"


def _size(value: Size) -> Union[str, int, float]:
    """A size for the daemon: strings as given (``"2GiB"``), numbers as MiB."""
    if isinstance(value, bool):
        raise TypeError("a size must be a string like '2GiB' or a number of MiB")
    return value


class Client:
    """A client for the vramgate daemon's HTTP API.

    Args:
        url: the daemon's base URL; default ``$VRAMGATE_URL``, else ``http://127.0.0.1:9777``
            (the same as the ``vramgate`` command line).
        token: the daemon's API token (``server.token``), sent as ``Authorization: Bearer
            TOKEN`` on every request, streams included; default ``$VRAMGATE_TOKEN``; ``None``
            with no such variable sends none.
        timeout: seconds to wait for the daemon to accept a connection and to answer quick
            requests (status, mode, acknowledgements). Calls that wait for work to be done
            (:meth:`load`, :meth:`unload`, :meth:`set_mode`, a lease waiting for memory) wait
            as long as the daemon takes unless given their own ``timeout``.

    Every method raises :class:`vramgate.VramgateError` when the daemon answers with an error
    (with its message and HTTP status), and :class:`vramgate.DaemonUnreachable` when no daemon
    answers at ``url``.
    """

    def __init__(
        self, url: Optional[str] = None, timeout: Timeout = 30.0, *, token: Optional[str] = None
    ) -> None:
        if url is None:
            url = os.environ.get("VRAMGATE_URL") or DEFAULT_URL
        if token is None:
            token = os.environ.get("VRAMGATE_TOKEN")
        self._endpoint = Endpoint(url, token)
        self.url: str = self._endpoint.url
        self.timeout: Timeout = timeout

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    # -- plain requests ---------------------------------------------------------------------

    def _call(
        self, method: str, path: str, body: Any = None, *, timeout: Union[Timeout, _Default] = _DEFAULT
    ) -> Any:
        read_timeout = self.timeout if isinstance(timeout, _Default) else timeout
        return request_json(
            self._endpoint,
            method,
            PREFIX + path,
            body,
            connect_timeout=self.timeout,
            read_timeout=read_timeout,
        )

    def _dict(
        self, method: str, path: str, body: Any = None, *, timeout: Union[Timeout, _Default] = _DEFAULT
    ) -> Dict[str, Any]:
        answer = self._call(method, path, body, timeout=timeout)
        if not isinstance(answer, dict):
            raise VramgateError(
                f"vramgate at {self.url} answered {method} {PREFIX}{path} with {answer!r}, not an object"
            )
        return answer

    def _list(self, path: str) -> List[Dict[str, Any]]:
        answer = self._call("GET", path)
        if not isinstance(answer, list):
            raise VramgateError(
                f"vramgate at {self.url} answered GET {PREFIX}{path} with {answer!r}, not a list"
            )
        return answer

    def health(self) -> Dict[str, Any]:
        """``GET /vramgate/health``: ``{"status": "ok", "version": ...}``."""
        return self._dict("GET", "/health")

    def status(self) -> Dict[str, Any]:
        """``GET /vramgate/status``: the status document (devices, levels, processes, models,
        leases, mode, degraded reasons), the same as ``vramgate status --json``."""
        return self._dict("GET", "/status")

    def models(self) -> List[Dict[str, Any]]:
        """``GET /vramgate/models``: every model's status entry."""
        return self._list("/models")

    def leases(self) -> List[Dict[str, Any]]:
        """``GET /vramgate/leases``: the leases held."""
        return self._list("/leases")

    def load(self, model_id: str, timeout: Timeout = None) -> Dict[str, Any]:
        """Loads a model (an id or an alias), evicting idle models if needed, and waits until it
        is ready. Returns the model's status entry.

        Args:
            model_id: the model.
            timeout: seconds to wait for the answer; ``None`` (default) waits as long as the
                daemon does (it gives up by itself after the model's ``ready_timeout`` or the
                queue's ``queue_timeout``).

        Raises:
            VramgateError: 404 unknown model, 422 it can never fit, 503 timed out or in a
                failure cooldown, 502 the server failed to start (the message has its log tail).
        """
        return self._dict("POST", f"/models/{_segment(model_id)}/load", timeout=timeout)

    def unload(self, model_id: str, timeout: Timeout = None) -> Dict[str, Any]:
        """Unloads a model and waits until its memory is back. Returns its status entry."""
        return self._dict("POST", f"/models/{_segment(model_id)}/unload", timeout=timeout)

    def mode(self) -> Dict[str, Any]:
        """``GET /vramgate/mode``: ``{"mode": current or None, "modes": {name: {"gpu": [...],
        "cpu": [...], "unload": [...]}}}``."""
        return self._dict("GET", "/mode")

    def set_mode(self, name: str, timeout: Timeout = None) -> Dict[str, Any]:
        """Applies the ``[modes.NAME]`` of the config (releases and demotions first, then loads)
        and waits until it is applied. Returns ``{"mode": name, "models": [...]}``."""
        return self._dict("POST", "/mode", {"mode": name}, timeout=timeout)

    # -- leases -----------------------------------------------------------------------------

    def lease(
        self,
        vram: Optional[Size] = None,
        holder: Optional[str] = None,
        exclusive: bool = False,
        device: Optional[int] = None,
        wait: Optional[Duration] = None,
        priority: Optional[int] = None,
        *,
        model: Optional[str] = None,
        pid: Optional[int] = None,
    ) -> Lease:
        """Holds VRAM until the returned :class:`Lease` is released; use it as a context
        manager::

            with client.lease(vram="2GiB", holder="ffmpeg") as lease:
                run_on_gpu(lease.device)

        The lease is tied to its connection: if this process dies, however it dies, the daemon
        releases it within a second. This call blocks until the lease is granted.

        Args:
            vram: memory to hold: ``"2GiB"``, ``"1536MiB"``, ``"6G"``, or a number of MiB.
            holder: who holds it, as shown in status and messages.
            exclusive: hold the whole device: granted only when no other lease holds it, and no
                other lease or load is granted there meanwhile.
            device: the GPU index; default: the daemon picks one.
            wait: how long the daemon may wait for memory (``"60s"``, or seconds); ``0`` fails at
                once. Default: the daemon's ``scheduler.queue_timeout``.
            priority: higher may evict more; default: the daemon's ``defaults.priority``.
            model: instead of ``vram``, keep this model loaded and in use while the lease is
                held (the lease's ``upstream`` is its server's URL). For an external model with
                no attached app this is the one-shot form: this process holds the model and
                loads it itself once the lease is granted.
            pid: the process whose GPU memory (with its children's) is the lease's: counted
                once, not again as foreign use; default: this process.

        Raises:
            VramgateError: 422 it can never fit, 503 it waited in vain (the numbers are in the
                message), 400 a bad request.
        """
        if (vram is None) == (model is None):
            raise ValueError("a lease takes `vram` (e.g. '2GiB') or `model`, exactly one of them")
        body: Dict[str, Any] = {"hold": "connection"}
        if vram is not None:
            body["vram"] = _size(vram)
        if model is not None:
            body["model"] = model
        # This process (and the jobs it starts) uses the lease's memory: counted once, as the
        # lease's, not again as foreign use.
        body["pid"] = int(pid) if pid is not None else os.getpid()
        if holder is not None:
            body["holder"] = holder
        if exclusive:
            body["exclusive"] = True
        if device is not None:
            body["device"] = int(device)
        if wait is not None:
            body["wait"] = _duration(wait)
        if priority is not None:
            body["priority"] = int(priority)
        # The daemon answers once the lease is granted, which may take up to `wait`.
        answer = open_request(
            self._endpoint,
            "POST",
            PREFIX + "/leases",
            body,
            connect_timeout=self.timeout,
            read_timeout=None,
            accept="application/x-ndjson",
        )
        try:
            first = parse_line(answer.readline())
        except (OSError, ValueError) as e:
            answer.close()
            raise VramgateError(f"the lease stream from {self.url} broke before the grant: {e}") from e
        if first is None or first.get("event") != "granted" or not isinstance(first.get("lease"), dict):
            answer.close()
            raise VramgateError(f"vramgate at {self.url} did not grant the lease (first line: {first!r})")
        return Lease(answer, first["lease"])

    # -- external models --------------------------------------------------------------------

    def attach(
        self,
        model_id: str,
        on_place: Callable[[str], Any],
        pid: Optional[int] = None,
        holder: Optional[str] = None,
    ) -> Attachment:
        """Attaches this application to an external model (``backend = "external"`` in the
        config), whose weights live in this process (e.g. CLIP in a PyTorch app).

        vramgate then decides where the model lives: ``on_place(action)`` is called from a
        background thread with ``"gpu"`` (move it to the GPU: the memory is reserved for you),
        ``"cpu"`` (move it off the GPU) or ``"release"`` (drop it), one instruction at a time.
        When ``on_place`` returns, the daemon is told it is done; when it raises, the daemon is
        told it failed, with the exception's text.

        The attachment lasts until :meth:`Attachment.close`, the end of a ``with`` block, or the
        end of the process; then the daemon counts everything the app held as released.

        Args:
            model_id: the external model's id.
            on_place: called with each action.
            pid: the process that holds the model's memory (default: this one), so that vramgate
                attributes its per-process VRAM to the model.
            holder: a name for status and messages.

        Raises:
            VramgateError: 404 unknown model, 400 not an external model, 409 another app is
                already attached to it.
        """
        body: Dict[str, Any] = {"pid": os.getpid() if pid is None else int(pid)}
        if holder is not None:
            body["holder"] = holder
        answer = open_request(
            self._endpoint,
            "POST",
            f"{PREFIX}/models/{_segment(model_id)}/attach",
            body,
            connect_timeout=self.timeout,
            read_timeout=self.timeout,
            accept="application/x-ndjson",
        )
        try:
            first = parse_line(answer.readline())
        except (OSError, ValueError) as e:
            answer.close()
            if isinstance(e, socket.timeout):
                raise VramgateError(f"vramgate at {self.url} accepted the attachment but sent nothing") from e
            raise VramgateError(f"the attachment stream from {self.url} broke at once: {e}") from e
        if first is None or first.get("event") != "attached":
            answer.close()
            raise VramgateError(f"vramgate at {self.url} did not attach {model_id} (first line: {first!r})")
        return Attachment(self, model_id, answer, first, on_place)

    def _post_ack(self, model_id: str, ack: Dict[str, Any]) -> None:
        """Acknowledges one instruction of an attachment."""
        self._call("POST", f"/models/{_segment(model_id)}/ack", ack)

    # -- events -----------------------------------------------------------------------------

    def events(self, timeout: Timeout = None) -> EventStream:
        """Follows the daemon's event stream::

            for event in client.events():
                if event["type"] == "level_changed":
                    print(event["device"], event["to"])

        The connection is opened by this call, so every event published after it returns is
        seen. ``break`` out of the loop, or close the stream, to stop (a ``with`` block closes it
        deterministically).

        Args:
            timeout: the longest silence to accept, in seconds; past it, iteration raises
                ``TimeoutError`` and the stream is closed. ``None`` (default)
                waits for ever; the daemon sends a keep-alive every 15 s.
        """
        answer = open_request(
            self._endpoint,
            "GET",
            PREFIX + "/events",
            connect_timeout=self.timeout,
            read_timeout=self.timeout,
            accept="text/event-stream",
        )
        answer.set_timeout(timeout)
        return EventStream(answer)
