"""What evotok's ASGI middlewares (the guard, the access log) share: they act on HTTP requests only, and
hand anything else (the lifespan's start-up and shutdown) to the application untouched."""

from __future__ import annotations

from typing import Any


class HttpMiddleware:
    """An ASGI middleware around `app` whose `http` sees every HTTP request, and nothing else."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    async def http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise NotImplementedError
