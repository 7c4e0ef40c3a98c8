"""Errors that become a clear HTTP answer with a JSON body."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """A failure the client should hear about, with the status that describes it."""

    def __init__(
        self, status: int, message: str, *, parameter: str | None = None,
        headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.parameter = parameter
        # A list of pairs may repeat a name (two WWW-Authenticate challenges, say).
        items = headers.items() if isinstance(headers, Mapping) else headers or []
        self.headers: list[tuple[str, str]] = list(items)

    def response(self) -> JSONResponse:
        response = JSONResponse(self.body(), status_code=self.status)
        for name, value in self.headers:
            response.headers.append(name, value)
        return response

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
