"""The HTTP layer: one connection per request, with streamed answers that can be closed from any
thread (which is how a lease or an attachment is given back: the daemon sees the connection go).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from typing import Any, Dict, Optional, Union
from urllib.parse import urlsplit

from .errors import DaemonUnreachable, VramgateError, error_from_answer

Timeout = Optional[float]

USER_AGENT = "vramgate-python"


class Endpoint:
    """A parsed daemon URL (``http://HOST:PORT`` with an optional path prefix) and the token sent
    to it as ``Authorization: Bearer TOKEN``, if any."""

    def __init__(self, url: str, token: Optional[str] = None) -> None:
        url = url.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"invalid vramgate URL {url!r}: expected http://HOST:PORT")
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname
        try:
            self.port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise ValueError(f"invalid vramgate URL {url!r}: {e}") from None
        self.prefix = parts.path.rstrip("/")
        # An empty token is no token, as an empty VRAMGATE_TOKEN is for the daemon and the CLI.
        self.token = token or None

    def connection(self, timeout: Timeout) -> http.client.HTTPConnection:
        """A new, unconnected connection."""
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


class Answer:
    """An open answer whose body is read as it comes.

    ``shutdown()`` may be called from any thread: it wakes a reader blocked on the socket, which
    then sees the end of the stream. ``close()`` releases everything; it is idempotent.
    """

    def __init__(
        self,
        conn: http.client.HTTPConnection,
        sock: socket.socket,
        response: http.client.HTTPResponse,
    ) -> None:
        self._conn = conn
        self._sock = sock
        self.response = response
        self._lock = threading.Lock()
        self._shut = False
        self._closed = False
        #: The read timeout in seconds (``None``: none).
        self.timeout: Timeout = sock.gettimeout()

    @property
    def status(self) -> int:
        """The HTTP status code."""
        return self.response.status

    def set_timeout(self, timeout: Timeout) -> None:
        """Sets the read timeout for what follows (``None``: wait for ever)."""
        self.timeout = timeout
        try:
            self._sock.settimeout(timeout)
        except OSError:
            pass

    def readline(self) -> bytes:
        """The next line, with its newline; ``b""`` at the end of the stream (or once shut down).

        Raises ``socket.timeout`` when the read timeout passes, ``OSError`` on a broken connection.
        """
        if self._shut:
            return b""
        try:
            return self.response.readline()
        except (ValueError, AttributeError):
            # The answer was closed under us: that is the end of the stream.
            if self._shut or self._closed:
                return b""
            raise
        except (http.client.IncompleteRead, OSError):
            if self._shut:
                return b""
            raise

    def read_all(self) -> bytes:
        """The rest of the body."""
        return self.response.read()

    def shutdown(self) -> None:
        """Ends the connection now (both directions): the daemon sees it closed, and a reader
        blocked in ``readline`` returns ``b""``."""
        with self._lock:
            if self._shut:
                return
            self._shut = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Shuts the connection down and frees it."""
        self.shutdown()
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for close in (self.response.close, self._conn.close, self._sock.close):
            try:
                close()
            except Exception:  # noqa: BLE001 - closing must never fail
                pass


def open_request(
    endpoint: Endpoint,
    method: str,
    path: str,
    body: Any = None,
    *,
    connect_timeout: Timeout,
    read_timeout: Timeout,
    accept: str = "application/json",
) -> Answer:
    """Sends a request and returns the open answer once its headers are in.

    Non-2xx answers raise :class:`VramgateError` with the daemon's message; a daemon that cannot
    be reached raises :class:`DaemonUnreachable`.
    """
    what = f"{method} {path}"
    conn = endpoint.connection(connect_timeout)
    try:
        conn.connect()
    except OSError as e:
        conn.close()
        raise DaemonUnreachable(endpoint.url, e) from e
    sock = conn.sock
    assert sock is not None
    try:
        sock.settimeout(read_timeout)
        headers: Dict[str, str] = {"Accept": accept, "User-Agent": USER_AGENT}
        if endpoint.token is not None:
            headers["Authorization"] = f"Bearer {endpoint.token}"
        data: Optional[bytes] = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        conn.request(method, endpoint.prefix + path, body=data, headers=headers)
        response = conn.getresponse()
    except socket.timeout as e:
        _quietly_close(conn, sock)
        raise VramgateError(
            f"no answer from vramgate at {endpoint.url} to {what} within {read_timeout} s"
        ) from e
    except (OSError, http.client.HTTPException) as e:
        _quietly_close(conn, sock)
        raise VramgateError(f"the connection to vramgate at {endpoint.url} broke during {what}: {e}") from e
    answer = Answer(conn, sock, response)
    if 200 <= response.status < 300:
        return answer
    try:
        raw = answer.read_all()
    except (OSError, http.client.HTTPException):
        raw = b""
    finally:
        answer.close()
    raise error_from_answer(response.status, raw, response.getheader("Retry-After"), what)


def request_json(
    endpoint: Endpoint,
    method: str,
    path: str,
    body: Any = None,
    *,
    connect_timeout: Timeout,
    read_timeout: Timeout,
) -> Any:
    """Sends a request and returns its JSON answer (``None`` for an empty body)."""
    answer = open_request(
        endpoint, method, path, body, connect_timeout=connect_timeout, read_timeout=read_timeout
    )
    try:
        raw = answer.read_all()
    except socket.timeout as e:
        raise VramgateError(
            f"vramgate at {endpoint.url} did not finish answering {method} {path} within {read_timeout} s"
        ) from e
    except (OSError, http.client.HTTPException) as e:
        raise VramgateError(
            f"the connection to vramgate at {endpoint.url} broke during {method} {path}: {e}"
        ) from e
    finally:
        answer.close()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError as e:
        raise VramgateError(
            f"vramgate at {endpoint.url} answered {method} {path} with something that is not JSON: {raw[:200]!r}",
            answer.status,
        ) from e


def parse_line(line: Union[bytes, str]) -> Optional[Dict[str, Any]]:
    """One NDJSON line as a dict; ``None`` for a blank line or one that is not a JSON object."""
    text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
    text = text.strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _quietly_close(conn: http.client.HTTPConnection, sock: socket.socket) -> None:
    for close in (conn.close, sock.close):
        try:
            close()
        except Exception:  # noqa: BLE001
            pass
