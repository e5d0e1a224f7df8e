"""RemoteRunError and its few subclasses; the API maps each class to one HTTP status."""

from __future__ import annotations

from typing import Any


class RemoteRunError(Exception):
    """A request the server will not carry out; `code` is the machine-readable reason."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None, details: list[Any] | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.details = details
        self.retry_after_s = retry_after_s  # sent as Retry-After (503, 429)

    def to_json(self) -> dict[str, Any]:
        """The error body of PROTOCOL.md."""
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return body


class BadRequest(RemoteRunError):
    """The request is malformed: bad JSON, unknown fields, wrong types."""

    code = "bad_request"


class InvalidParams(RemoteRunError):
    """The params do not satisfy the script's parameter schema."""

    code = "invalid_params"


class BadMetadata(RemoteRunError):
    """A script's metadata (its sidecar `<script>.toml`) is malformed: listed, never run."""

    code = "bad_metadata"


class Unencodable(RemoteRunError):
    """Text UTF-8 cannot encode (a lone surrogate, a header that is not UTF-8): refused at
    the door, since stored it would break every answer that shows it."""

    code = "invalid_encoding"


class NotFound(RemoteRunError):
    """No such task or script."""

    code = "not_found"


class Conflict(RemoteRunError):
    """The task is in a state that does not allow the action."""

    code = "conflict"


class IntegrityFailed(Conflict):
    """The script failed its integrity check (its pinned sha256, its signature): refused."""

    code = "integrity_failed"


class Unauthorized(RemoteRunError):
    """No token, or one the server does not know."""

    code = "unauthorized"


class Forbidden(RemoteRunError):
    """The token's role or script list does not allow the action."""

    code = "forbidden"


class Gone(RemoteRunError):
    """The archived output was pruned by retention."""

    code = "gone"


class Unavailable(RemoteRunError):
    """The server is shutting down and takes no new work."""

    code = "shutting_down"


class TooLarge(RemoteRunError):
    """The request body or message is over the configured limit."""

    code = "too_large"


class BadOrigin(Forbidden):
    """A browser request (or WebSocket upgrade) sent by a page of another origin."""

    code = "bad_origin"


class UnsupportedMediaType(RemoteRunError):
    """A POST body that is not JSON: a browser's cross-site form or no-cors fetch sends those."""

    code = "unsupported_media_type"


class MisdirectedRequest(RemoteRunError):
    """A Host header this server does not answer to without tokens (DNS rebinding)."""

    code = "misdirected_request"


class TooManyRequests(RemoteRunError):
    """Too many failed logins or 401s from one address: it must wait `retry_after_s`."""

    code = "too_many_requests"


class QueueFull(Unavailable):
    """`engine.max_pending` tasks already wait: the client should retry later."""

    code = "queue_full"


class Relayed(RemoteRunError):
    """Another node's error answer to a request passed on to it, given back as it came."""

    def __init__(self, status: int, body: dict[str, Any]):
        super().__init__(str(body.get("message", "")), code=str(body.get("error", "error")),
                         details=body.get("details"))
        self.status = status
