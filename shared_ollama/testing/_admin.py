"""The FakeEngine's admin routes under /_fake/: drive faults, stats and timing over HTTP, for
an engine running in another process. Never counted in stats, never faulted, never guarded."""

from __future__ import annotations

import dataclasses
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._runtime import Settings

__all__ = ["admin_app"]


def admin_app(settings: Settings) -> Starlette:
    """``POST /_fake/faults`` arms a fault ({"action": "fail", "status": 503, ...}, or a list of
    them; "clear" disarms), ``GET`` lists them; ``GET /_fake/stats``, ``POST
    /_fake/stats/reset``; ``GET /_fake/timing``, ``POST`` changes some of its fields."""

    def armed() -> list[dict[str, Any]]:
        return [dataclasses.asdict(f) for f in settings.faults.pending()]

    async def faults(request: Request) -> Response:
        if request.method == "POST":
            body = await _json(request)
            try:
                for spec in body if isinstance(body, list) else [body]:
                    settings.faults.apply(spec)
            except (TypeError, ValueError) as exc:
                return JSONResponse({"error": str(exc)}, 400)
        return JSONResponse({"armed": armed()})

    async def stats(request: Request) -> Response:
        return JSONResponse(settings.stats.snapshot().to_json())

    async def reset_stats(request: Request) -> Response:
        settings.stats.reset()
        return JSONResponse(settings.stats.snapshot().to_json())

    async def timing(request: Request) -> Response:
        if request.method == "POST":
            body = await _json(request)
            try:
                settings.timing = dataclasses.replace(settings.timing, **body)
            except (TypeError, ValueError) as exc:
                return JSONResponse({"error": str(exc)}, 400)
        return JSONResponse(dataclasses.asdict(settings.timing))

    return Starlette(
        routes=[
            Route("/_fake/faults", faults, methods=["GET", "POST"]),
            Route("/_fake/stats", stats, methods=["GET"]),
            Route("/_fake/stats/reset", reset_stats, methods=["POST"]),
            Route("/_fake/timing", timing, methods=["GET", "POST"]),
        ]
    )


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None
