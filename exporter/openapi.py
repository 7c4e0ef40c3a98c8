"""Helpers for what the routes read by hand from the request, declared for the OpenAPI
schema (each feature's `openapi.py` holds its declarations).

The routes take the Request and parse the query string and headers themselves (the
filter grammar has open-ended names), so FastAPI cannot see those inputs. Declaring
them changes no behaviour: it documents the API and lets a schema-driven fuzzer
(tests/test_fuzz_api.py) reach the parsers behind them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def get_and_head(router: APIRouter, path: str, **options: Any) -> Callable[[Endpoint], Endpoint]:
    """One endpoint for GET and HEAD, as two routes: one route with both methods gives
    both operations one operationId in the schema (FastAPI warns, and clients generated
    from it clash)."""
    def register(endpoint: Endpoint) -> Endpoint:
        for method in ("GET", "HEAD"):
            router.add_api_route(path, endpoint, methods=[method], **options)
        return endpoint
    return register


def query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or {"type": "string"}}


def header(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description,
            "schema": {"type": "string"}}
