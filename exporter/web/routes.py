"""GET /metrics on the app's port, for admins' tokens (Prometheus' `authorization`
with a bearer token). The same without authentication on EXPORTER_METRICS_BIND, an
address only the monitoring reaches (exporter/server/metrics.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from exporter.access.deps import AdminDep, StateDep
from exporter.metrics import Sources, scrape

router = APIRouter()


@router.get("/metrics", response_class=Response, responses={
    200: {"description": "Prometheus' text format (OpenMetrics if the Accept header asks"
                         " for it)", "content": {"text/plain": {}}},
    401: {"description": "no credentials"}, 403: {"description": "not an admin"}})
async def metrics(request: Request, st: StateDep, admin: AdminDep) -> Response:
    sources = Sources(st.engine, st.replica, st.audit, st.settings.exports_max_bytes)
    body, media_type = await scrape(sources, request.headers.get("accept"))
    return Response(body, media_type=media_type)
