"""The sender's errors as HTTP responses; codes, statuses and messages come from :mod:`contract.errors`."""

from __future__ import annotations

from starlette.responses import Response

from contract.errors import INVALID_REQUEST, ErrorKind, error_body


class ApiError(Exception):
    """An error the sender answers itself, as OpenAI would shape it."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str | None = None,
        *,
        param: str | None = None,
        retry_after: int | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message or kind.message)
        self.kind = kind
        self.message = message or kind.message
        self.param = param
        self.retry_after = retry_after
        self.close = close
        """Answer with ``Connection: close``: the rest of the request may still be on its way."""

    @property
    def code(self) -> str:
        return self.kind.code

    @property
    def status(self) -> int:
        return self.kind.status

    def response(self) -> Response:
        return error_response(
            self.kind.status,
            self.message,
            type=self.kind.type,
            code=self.kind.code,
            param=self.param,
            retry_after=self.retry_after,
            close=self.close,
        )


def error_response(
    status: int,
    message: str,
    *,
    type: str = INVALID_REQUEST,
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
