"""Errors in the shapes vLLM's OpenAI server answers with, so a proxy relays the same bytes."""

from __future__ import annotations

from http import HTTPStatus

import orjson


class ApiError(Exception):
    """An OpenAI-style error: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.error_type, "param": None, "code": self.status}
        return orjson.dumps({"error": error})


def bad_request(message: str) -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, message, "BadRequestError")


def model_not_found(model: str) -> ApiError:
    return ApiError(HTTPStatus.NOT_FOUND, f"The model `{model}` does not exist.", "NotFoundError")
