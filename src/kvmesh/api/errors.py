"""OpenAI-style error responses.  Every error the gateway returns goes through :class:`ApiError`."""

from __future__ import annotations

import json

from aiohttp import web

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "internal_error", 502: "upstream_error", 503: "service_unavailable", 504: "timeout_error"}


class ApiError(Exception):
    """An error answered to the client as ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "",
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or _TYPES.get(status, "error")
        self.retry_after = retry_after

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.status}}

    def response(self) -> web.Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return web.Response(status=self.status, text=json.dumps(self.body()),
                            content_type="application/json", headers=headers)

    def sse(self) -> bytes:
        """The same error as a final SSE event, for streams that already started."""
        return f"data: {json.dumps(self.body())}\n\n".encode()
