"""Exceptions raised by the vramgate client."""

from __future__ import annotations

import json
from typing import Any, Optional

__all__ = ["VramgateError", "DaemonUnreachable"]


class VramgateError(Exception):
    """The daemon refused a request, or the exchange with it failed.

    Attributes:
        message: the daemon's message (``body["error"]["message"]`` when the answer is JSON,
            else the answer's text), or a description of what failed on the client's side.
        status: the HTTP status code, or ``None`` when no answer came (connection failures).
        code: the error's ``code`` field when the daemon sent one (e.g. ``404`` on the
            management API, ``"insufficient_vram"`` on the OpenAI surface), else ``None``.
        retry_after: seconds from the ``Retry-After`` header when present, else ``None``.
        body: the parsed JSON answer, or its text when it is not JSON, or ``None``.
    """

    def __init__(
        self,
        message: str,
        status: Optional[int] = None,
        *,
        code: Any = None,
        retry_after: Optional[float] = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.body = body

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status={self.status!r})"


class DaemonUnreachable(VramgateError, ConnectionError):
    """No daemon answers at the client's URL (connection refused, unknown host, timeout)."""

    def __init__(self, url: str, cause: BaseException) -> None:
        reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        super().__init__(
            f"vramgate is not reachable at {url}: {reason}. "
            "Is `vramgate serve` running? (pass url= or set VRAMGATE_URL)"
        )
        self.url = url
        self.cause = cause


def error_from_answer(status: int, raw: bytes, retry_after_header: Optional[str], what: str) -> VramgateError:
    """Builds the exception for a non-2xx answer.

    Args:
        status: the HTTP status code.
        raw: the answer's body.
        retry_after_header: the ``Retry-After`` header, if any.
        what: the request, for answers without a message (``"POST /vramgate/leases"``).
    """
    text = raw.decode("utf-8", errors="replace").strip()
    body: Any = text or None
    message: Optional[str] = None
    code: Any = None
    try:
        parsed = json.loads(text) if text else None
    except ValueError:
        parsed = None
    if parsed is not None:
        body = parsed
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(error, dict):
            if isinstance(error.get("message"), str):
                message = error["message"]
            code = error.get("code")
        elif isinstance(error, str):
            message = error
    if message is None:
        message = text or f"HTTP {status} from {what}"
    return VramgateError(
        message, status, code=code, retry_after=_parse_retry_after(retry_after_header), body=body
    )


def _parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or ``None``."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime
        from datetime import datetime, timezone

        when = parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError, IndexError):
        return None
