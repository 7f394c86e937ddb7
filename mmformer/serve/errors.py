"""Errors in OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``, with the HTTP status."""

from __future__ import annotations

from typing import Any

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         413: "invalid_request_error", 500: "server_error", 503: "server_error"}  # fmt: skip


class APIError(Exception):
    """A request the server answers with ``status`` and OpenAI's error body; ``param`` names the offending field."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad_request(param: str, message: str, code: str | None = None) -> APIError:
    """A 400 naming the field at fault: ``param`` leads the message, as the project's errors name their argument."""
    return APIError(400, f"{param}: {message}", param=param, code=code)
