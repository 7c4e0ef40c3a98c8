"""Errors that become a clear HTTP answer with a JSON body."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A failure the client should hear about, with the status that describes it."""

    def __init__(
        self, status: int, message: str, *, parameter: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.parameter = parameter
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"status": self.status, "message": self.message}
        if self.parameter is not None:
            error["parameter"] = self.parameter
        return {"error": error}


def bad_parameter(parameter: str, message: str) -> ApiError:
    return ApiError(400, message, parameter=parameter)


def unavailable(error: BaseException) -> ApiError:
    return ApiError(503, f"the database is unavailable: {type(error).__name__}: {error}",
                    headers={"Retry-After": "5"})
