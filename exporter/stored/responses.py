"""The HTTP of the stored exports: their answers as responses, and the resume copies'
HTTP side (the 206 a continuation of a streamed export is)."""

from __future__ import annotations

from typing import Any

from fastapi import Request, Response

from exporter.exports.resume_copies import Continuation
from exporter.state import get_state
from exporter.stored.resume_copies import StoredResumeCopies


class ServedResumeCopies(StoredResumeCopies):
    """State.resume_copies (exports/responses.py's `ServedCopies`)."""

    async def answer(self, request: Request, found: Continuation) -> Response:
        # The request holds its lease already: the export's admission took it before
        # the lookup (exporter/exports/service.py).
        response = await self._service.file(request, get_state(request), found.principal,
                                            found.copy_id)
        if response.status_code == 206 and found.offset is not None:
            body: Any = getattr(response, "body_iterator", None)
            if body is not None:
                setattr(response, "body_iterator",  # noqa: B010
                        self.counting(body, found.copy_id, found.offset))
        return response
