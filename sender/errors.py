"""OpenAI-shaped errors: ``{"error": {"message", "type", "code"}}``."""

from __future__ import annotations

import orjson
from starlette.responses import Response


class ApiError(Exception):
    """An error the sender answers itself, as OpenAI would shape it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.close = close
        """Answer with ``Connection: close``: the rest of the request may still be on its way."""

    def response(self) -> Response:
        return error_response(
            self.status,
            self.message,
            type=self.type,
            code=self.code,
            param=self.param,
            retry_after=self.retry_after,
            close=self.close,
        )


def error_body(message: str, *, type: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    retry_after: int | None = None,
    close: bool = False,
) -> Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    if close:
        headers["Connection"] = "close"
    return Response(
        error_body(message, type=type, code=code, param=param),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def sse_error_event(message: str, *, type: str = "server_error", code: str | None = None) -> bytes:
    """An error inside an event stream that already started with status 200."""
    return b"data: " + error_body(message, type=type, code=code) + b"\n\n"
