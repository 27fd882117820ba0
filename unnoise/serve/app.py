"""The FastAPI application: lifespan (store, engine), errors as JSON naming the field, API keys, metrics, page.

``create_app(config)`` is all a test or an embedding needs; ``server.serve`` runs it under uvicorn with SIGTERM
draining. A request that finds the job store's database unreachable gets 503 with ``Retry-After``
(``store_unavailable``), in the error body every API shares. /health, /ready, /metrics and the page at / are open;
every /v1 and /sdapi route needs a key when keys are configured (``Authorization: Bearer KEY``, as OpenAI clients
send, ``X-API-Key: KEY``, or HTTP Basic with the key as the password, as AUTOMATIC1111 clients send its
``--api-auth``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import importlib.resources
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from unnoise.pipeline import Pipeline
from unnoise.safety import SafetyChecker
from unnoise.serve.config import ServeConfig
from unnoise.serve.engine import Engine
from unnoise.serve.metrics import CONTENT_TYPE
from unnoise.serve.store import StoreUnavailable
from unnoise.serve.validation import ApiError


def create_app(config: ServeConfig, *, safety: SafetyChecker | None = None, pipe: Pipeline | None = None) -> FastAPI:
    """The server for ``config``; ``pipe`` replaces loading ``config.model`` and ``safety`` the checker that
    ``config.safety`` asks for (tests, embedding)."""
    from unnoise.serve import a1111, openai  # the routes import this module's helpers
    from unnoise.serve.routes import router

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = config.open_store()
        engine = Engine(config, store, safety)
        app.state.store, app.state.engine = store, engine
        engine.start(pipe)
        try:
            yield
        finally:
            engine.stop()
            store.close()

    # FastAPI's /docs and /redoc load their scripts from a CDN; _open_routes serves /docs with a package's files
    app = FastAPI(title="unnoise", summary="Text-to-image diffusion: OpenAI Images and AUTOMATIC1111 compatible",
                  lifespan=lifespan, docs_url=None, redoc_url=None)  # fmt: skip
    app.state.config = config
    app.state.keys = KeyCheck(config.api_keys)
    app.add_middleware(RequestMetrics)
    _add_error_handlers(app)
    app.include_router(_open_routes())
    app.include_router(openai.router, dependencies=[Depends(require_key)])
    app.include_router(a1111.router, dependencies=[Depends(require_key)])
    app.include_router(router, dependencies=[Depends(require_key)])
    return app


class KeyCheck:
    """Constant-time API key check: every configured key is compared with the sha256 of the one given."""

    def __init__(self, keys: Sequence[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __call__(self, given: str | None) -> bool:
        digest = hashlib.sha256((given or "").encode()).digest()
        ok = False
        for key in self._digests:  # no early exit: the time does not depend on which key matched
            ok |= hmac.compare_digest(key, digest)
        return ok and given is not None


def require_key(request: Request) -> None:
    keys: KeyCheck = request.app.state.keys
    if not keys.enabled:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key")
    if header.lower().startswith("basic "):  # AUTOMATIC1111's --api-auth, as its clients send it: the key as password
        try:
            given = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            given = ""
    if not keys(given):
        why = "no API key was given" if given is None else "the API key is not valid"
        raise ApiError(401, f"{why}; send Authorization: Bearer KEY, X-API-Key: KEY or HTTP Basic with the key as "
                       "password", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


class RequestMetrics:
    """ASGI middleware counting responses by route template and status (``unnoise_http_requests_total``)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def record(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = scope.get("route")
            engine = getattr(scope["app"].state, "engine", None)
            if engine is not None:
                path = getattr(route, "path", "unmatched")
                engine.metrics.requests.inc(route=path, status=str(status[0]))


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, error: StoreUnavailable) -> JSONResponse:
        return await api_error(request, ApiError(503, f"{error}; retry later", code="store_unavailable",
                                                 headers={"Retry-After": str(STORE_RETRY_AFTER_S)}))  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        loc = [str(part) for part in first["loc"] if part not in ("body", "query", "path")]
        param = ".".join(loc) or None
        if param is None:
            message = f"the request body is not valid JSON for this endpoint: {first['msg']}"
        elif first["type"] == "missing":
            message = f"{param} is required"
        else:
            message = f"{param}={first.get('input')!r} is not allowed; {first['msg']}"
        return await api_error(request, ApiError(422, message, param=param, code="invalid_value"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return await api_error(request, ApiError(error.status_code, str(error.detail), headers=error.headers))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        message = f"internal error: {type(error).__name__}: {error}"
        return await api_error(request, ApiError(500, message, code="internal_error"))


STORE_RETRY_AFTER_S = 5  # Retry-After of a request that found the job store's database unreachable

# Swagger UI's files as the fastapi-offline package ships them, so that /docs works without internet (no ReDoc: its
# page loads a logo from a CDN).
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}


def _package_file(package: str, name: str, media_type: str) -> Response:
    return Response(importlib.resources.files(package).joinpath(name).read_bytes(), media_type=media_type)


def _open_routes() -> Any:
    from fastapi import APIRouter

    open_router = APIRouter()

    @open_router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(importlib.resources.files("unnoise.serve").joinpath("static/index.html").read_text())

    @open_router.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return _package_file("unnoise.serve", "static/favicon.ico", "image/x-icon")

    @open_router.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=root + request.app.openapi_url, title="unnoise API",
                                   swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
                                   swagger_favicon_url=f"{root}/favicon.ico")  # fmt: skip

    @open_router.get("/docs/assets/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        if name not in DOCS_ASSETS:
            raise ApiError(404, f"there is no docs file {name!r}", param="name", code="not_found")
        return _package_file("fastapi_offline", f"static/{name}", DOCS_ASSETS[name])

    @open_router.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @open_router.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """Readiness: the model is loaded and warmed up, the job store answers, and the server is not draining."""
        engine: Engine = request.app.state.engine
        if engine.ready and not engine.draining:
            try:
                await asyncio.to_thread(engine.store.ping)
            except StoreUnavailable as error:
                return JSONResponse({"status": "store_unavailable", "error": str(error)}, status_code=503,
                                    headers={"Retry-After": str(STORE_RETRY_AFTER_S)})  # fmt: skip
            pipe = engine.pipe
            body = {"status": "ready", "model": pipe.name, "model_hash": pipe.model_hash, "device": str(pipe.device)}
            return JSONResponse(body)
        status = "draining" if engine.draining else "failed" if engine.load_error else "loading"
        return JSONResponse({"status": status, "error": engine.load_error}, status_code=503)

    @open_router.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus text format."""
        return Response(request.app.state.engine.metrics.render(), media_type=CONTENT_TYPE)

    return open_router
