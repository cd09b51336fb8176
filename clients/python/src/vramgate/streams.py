"""Long-lived answers: a lease held by its connection, an external model's attachment, and the
event stream."""

from __future__ import annotations

import json
import logging
import socket
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Type

from ._http import Answer, parse_line
from .errors import VramgateError

if TYPE_CHECKING:  # pragma: no cover
    from .client import Client

__all__ = ["Lease", "Attachment", "EventStream"]

log = logging.getLogger("vramgate")

#: How long ``close()`` waits for a background reader to notice the closed connection.
_JOIN_TIMEOUT = 5.0


class Lease:
    """VRAM held for as long as this object's connection is open.

    Made by :meth:`vramgate.Client.lease`. Use it as a context manager, or call
    :meth:`release`; the daemon also releases it when the process exits, however it exits.

    Attributes:
        grant: the daemon's grant, as sent (``id``, ``holder``, ``device``, ``vram_mib``,
            ``exclusive``, and for a model lease ``model`` and ``upstream``).
        id: the lease id (as in ``status()["leases"]``).
        device: the GPU index the lease is on (``None`` for a model lease on a machine without
            GPUs).
        vram_mib: MiB held.
        holder: who holds it, as the daemon records it.
        exclusive: whether no other lease or load may use the device meanwhile.
        model: for a model lease, the model kept loaded; else ``None``.
        upstream: for a model lease, the model server's base URL; else ``None``.
        heartbeats: how many heartbeat lines the daemon has sent so far.
        error: why the lease ended without :meth:`release` (the daemon stopped or the connection
            broke), else ``None``.
    """

    def __init__(self, answer: Answer, grant: Dict[str, Any]) -> None:
        self._answer = answer
        self.grant: Dict[str, Any] = grant
        self.id: str = str(grant.get("id"))
        self.device: Optional[int] = grant.get("device")
        self.vram_mib: int = int(grant.get("vram_mib") or 0)
        self.holder: Optional[str] = grant.get("holder")
        self.exclusive: bool = bool(grant.get("exclusive", False))
        self.model: Optional[str] = grant.get("model")
        self.upstream: Optional[str] = grant.get("upstream")
        self.heartbeats = 0
        self.error: Optional[BaseException] = None
        self._releasing = False
        self._ended = threading.Event()
        # Keep reading: the daemon notices a dead client by failing writes, and a reader that
        # stopped would eventually fill the buffers.
        answer.set_timeout(None)
        self._thread = threading.Thread(target=self._read, name=f"vramgate-lease-{self.id}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                line = self._answer.readline()
                if not line:
                    break
                event = parse_line(line)
                if event is not None and event.get("event") == "held":
                    self.heartbeats += 1
        except Exception as e:  # noqa: BLE001 - recorded for the holder
            if not self._releasing:
                self.error = e
        finally:
            if not self._releasing and self.error is None:
                self.error = VramgateError(f"the daemon ended lease {self.id}")
            if self.error is not None:
                log.warning("vramgate lease %s lost: %s", self.id, self.error)
            self._answer.close()
            self._ended.set()

    @property
    def active(self) -> bool:
        """Whether the lease is still held (not released, and the daemon still streams it)."""
        return not self._ended.is_set() and not self._releasing

    def release(self) -> None:
        """Gives the lease back (closes its connection). Idempotent."""
        self._releasing = True
        self._answer.shutdown()
        if threading.current_thread() is not self._thread:
            self._thread.join(_JOIN_TIMEOUT)
        self._answer.close()

    close = release

    def __enter__(self) -> "Lease":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "active" if self.active else "released"
        return f"<Lease {self.id} {self.vram_mib} MiB on GPU {self.device} {state}>"


class Attachment:
    """An application's attachment to an external model (``backend = "external"``).

    Made by :meth:`vramgate.Client.attach`. A background thread receives the daemon's placement
    instructions, calls ``on_place(action)`` with ``"gpu"``, ``"cpu"`` or ``"release"`` and
    acknowledges each one. Closing the attachment (``close()``, leaving a ``with`` block, or the
    process exiting) tells the daemon that everything the app held is released.

    Attributes:
        model: the model id.
        session: the daemon's session id for this attachment.
        placement: the last action ``on_place`` completed (``"gpu"``, ``"cpu"``, ``"release"``),
            or ``None`` before the first instruction.
        closed: whether the attachment has ended (closed here, or the daemon ended it).
        error: why the attachment ended without ``close()``, or the last failed acknowledgement;
            else ``None``.
    """

    def __init__(
        self,
        client: "Client",
        model: str,
        answer: Answer,
        first: Dict[str, Any],
        on_place: Callable[[str], Any],
    ) -> None:
        self._client = client
        self._answer = answer
        self._on_place = on_place
        self.model: str = str(first.get("model") or model)
        self.session: str = str(first.get("session"))
        self.placement: Optional[str] = None
        self.error: Optional[BaseException] = None
        self._closing = False
        self._ended = threading.Event()
        self._placed = threading.Condition()
        answer.set_timeout(None)
        self._thread = threading.Thread(target=self._run, name=f"vramgate-attach-{self.model}", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        """Whether the attachment has ended."""
        return self._closing or self._ended.is_set()

    def _run(self) -> None:
        try:
            while True:
                line = self._answer.readline()
                if not line:
                    break
                event = parse_line(line)
                if event is None or event.get("event") != "instruction":
                    continue  # heartbeats, and events this client does not know yet
                self._follow(event)
        except Exception as e:  # noqa: BLE001 - recorded for the app
            if not self._closing:
                self.error = e
        finally:
            if not self._closing and self.error is None:
                self.error = VramgateError(f"the daemon ended the attachment of {self.model}")
            if not self._closing:
                log.warning("vramgate attachment of %s ended: %s", self.model, self.error)
            self._answer.close()
            self._ended.set()
            with self._placed:
                self._placed.notify_all()

    def _follow(self, event: Dict[str, Any]) -> None:
        seq = event.get("seq")
        action = str(event.get("action"))
        ack: Dict[str, Any] = {"session": self.session, "seq": seq}
        try:
            self._on_place(action)
        except Exception as e:  # noqa: BLE001 - reported to the daemon
            log.warning("vramgate: on_place(%r) for %s failed: %s", action, self.model, e, exc_info=True)
            ack.update(ok=False, error=str(e) or type(e).__name__)
        else:
            ack["ok"] = True
            with self._placed:
                self.placement = action
                self._placed.notify_all()
        if self._closing:
            return  # the connection is gone: the daemon has released everything already
        try:
            self._client._post_ack(self.model, ack)
        except VramgateError as e:
            self.error = e
            log.warning("vramgate: acknowledging %r (seq %s) for %s failed: %s", action, seq, self.model, e)

    def wait_for(self, placement: str, timeout: Optional[float] = None) -> bool:
        """Blocks until ``placement`` is the current placement, the attachment ends, or
        ``timeout`` seconds pass; returns whether the placement was reached."""
        with self._placed:
            return (
                self._placed.wait_for(lambda: self.placement == placement or self._ended.is_set(), timeout)
                and self.placement == placement
            )

    def close(self) -> None:
        """Detaches: the daemon releases what the app held. Idempotent; callable from
        ``on_place`` too."""
        self._closing = True
        self._answer.shutdown()
        if threading.current_thread() is not self._thread:
            self._thread.join(_JOIN_TIMEOUT)
            self._answer.close()

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "attached"
        return f"<Attachment {self.model} session={self.session} placement={self.placement} {state}>"


class EventStream(Iterator[Dict[str, Any]]):
    """The daemon's event stream, one dict per event (``seq``, ``time``, ``type`` and the
    event's fields).

    Made by :meth:`vramgate.Client.events`, which opens the connection at once: every event
    published after that call returns is seen. Iterate it; ``break`` (or ``close()``, or leaving
    a ``with`` block) closes the connection. Iteration ends when the daemon closes the stream
    (at shutdown).
    """

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self._closed = False
        #: The ``id:`` of the last event (its sequence number), for diagnostics.
        self.last_id: Optional[str] = None

    @property
    def closed(self) -> bool:
        """Whether the stream is closed."""
        return self._closed

    def __iter__(self) -> "EventStream":
        return self

    def __next__(self) -> Dict[str, Any]:
        if self._closed:
            raise StopIteration
        data: List[str] = []
        try:
            while True:
                raw = self._answer.readline()
                if not raw:
                    self.close()
                    raise StopIteration
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if line == "":
                    if data:
                        payload = "\n".join(data)
                        try:
                            value = json.loads(payload)
                        except ValueError:
                            value = {"type": "unparsed", "data": payload}
                        return value if isinstance(value, dict) else {"type": "unparsed", "data": value}
                    continue
                if line.startswith(":"):
                    continue  # keep-alive comment
                field, _, value = line.partition(":")
                if value.startswith(" "):
                    value = value[1:]
                if field == "data":
                    data.append(value)
                elif field == "id":
                    self.last_id = value
        except StopIteration:
            raise
        except socket.timeout as e:
            self.close()
            raise TimeoutError(f"no event from vramgate within {self._answer.timeout} s") from e
        except BaseException:
            # A timeout leaves the buffered reader unusable, and a broken connection is over.
            self.close()
            raise

    def close(self) -> None:
        """Closes the connection. Idempotent; callable from another thread."""
        self._closed = True
        self._answer.close()

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
