"""Errors in the shapes vLLM's OpenAI server answers with, so a proxy relays the same bytes."""

from __future__ import annotations

from http import HTTPStatus

import orjson


class ApiError(Exception):
    """An OpenAI-style error: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, error_type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.error_type, "param": self.param, "code": self.status}
        return orjson.dumps({"error": error})


def bad_request(message: str, param: str | None = None, value: object = None) -> ApiError:
    """A check of vLLM's own; like vLLM 0.32, the message ends naming the parameter (and value)."""
    if param is not None:
        detail = f"parameter={param}" + ("" if value is None else f", value={value}")
        message = f"{message} ({detail})"
    return ApiError(HTTPStatus.BAD_REQUEST, message, "BadRequestError", param)


def invalid_field(name: str, what: str, value: object = None) -> ApiError:
    """A body field of the wrong type: vLLM's request validation answers these, typed ``Bad Request``."""
    loc = f"body.{name}" if name else "body"
    error = {"type": "invalid", "loc": loc, "msg": f"Input should be {what}", "input": value}
    return ApiError(HTTPStatus.BAD_REQUEST, f"1 validation error:\n  {error}", "Bad Request", loc)


def model_not_found(model: str, served: str) -> ApiError:
    message = f"The model `{model}` does not exist. Valid aliases: {served}."
    return ApiError(HTTPStatus.NOT_FOUND, message, "NotFoundError", "model")
