"""Liveness and readiness: what an orchestrator or load balancer polls."""

from __future__ import annotations

import asyncio

from litestar import Response, get
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from sqlalchemy import text

from ledger.http.schemas import Health
from ledger.service.unit_of_work import in_doubt, invalidate

READINESS_TIMEOUT_SECONDS = 2.0


@get("/health/live", operation_id="healthLive", tags=["health"])
async def live() -> Health:
    """The process is up and serving."""
    return Health(status="ok")


@get(
    "/health/ready",
    operation_id="healthReady",
    tags=["health"],
    responses={503: ResponseSpec(Health, description="Not ready: the database cannot be reached or is not migrated")},
)
async def ready(state: State) -> Response[Health]:
    """200 when the database answers and its schema is at this build's migration head."""
    try:
        async with state.engine.connect() as connection:
            try:
                async with asyncio.timeout(READINESS_TIMEOUT_SECONDS):
                    version = (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalar()
            except BaseException as error:
                if in_doubt(error):  # a timed-out query: never hand this connection to anyone
                    await invalidate(connection)
                raise
    except Exception as error:  # any failure to answer means: not ready
        return Response(Health(status="unavailable", checks={"database": type(error).__name__}), status_code=503)
    if version != state.schema_head:
        return Response(
            Health(
                status="unavailable", checks={"database": "ok", "schema": f"at {version}, expected {state.schema_head}"}
            ),
            status_code=503,
        )
    return Response(Health(status="ok", checks={"database": "ok", "schema": str(version)}), status_code=200)


# Litestar appends "; charset=utf-8" to every text/* media type: naming it here as well
# doubled it.
METRICS_MEDIA_TYPE = "text/plain; version=0.0.4"


@get("/metrics", operation_id="metrics", tags=["health"], media_type=METRICS_MEDIA_TYPE)
async def metrics_endpoint(state: State) -> str:
    """Prometheus text format for the whole service (every worker): requests, latencies,
    transfer outcomes, retries, 503s, group commit, the pool, and readiness."""
    # Readiness as /health/ready answers it, bounded so that a scrape always answers:
    # a database that does not answer in time means not ready.
    try:
        async with asyncio.timeout(READINESS_TIMEOUT_SECONDS + 1):
            is_ready = (await ready.fn(state)).status_code == 200
    except TimeoutError:
        is_ready = False
    return state.metrics.render(ready=is_ready)
