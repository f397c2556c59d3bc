"""The Quart app: OpenAI-compatible routes, the API key check, errors in OpenAI's shape.

`create_app(engine, config)` takes a started engine (an `EngineClient`, or anything with its
interface) and serves it; the CLI runs the app on hypercorn under uvloop.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from dataclasses import dataclass, field

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from api.console import console_blueprint
from api.errors import ApiError, error_body
from api.metrics import ServingMetrics
from api.openapi import openapi_document
from api.responses_api import ResponsesServing, register_responses_routes
from api.responses_store import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, ResponseStore
from api.serving import OpenAIServing, json_response
from api.stats_log import STATS_LOG_INTERVAL_S, log_engine_stats
from api.stats_view import StatsHistory
from api.tools import ToolConfig

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 1024 * 1024
BODY_TIMEOUT_S = 30.0  # a body not fully received by then is a 408 (a slow-upload client)
MAX_HEADERS, MAX_HEADER_BYTES = 100, 16 * 1024  # beyond either: 431


@dataclass(frozen=True)
class ServerConfig:
    """HTTP-side settings. `max_logprobs` mirrors the engine's `--max-logprobs`; the tool
    flags and `--chat-template` act in the API process (templates, parsers)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_logprobs: int = 20
    tool_config: ToolConfig = field(default_factory=ToolConfig)
    chat_template: str | None = None  # --chat-template: the file's text
    trust_request_chat_template: bool = False  # --trust-request-chat-template
    max_feature_tags: int = 64  # distinct cost-attribution labels; beyond them "other"
    enable_log_requests: bool = False  # one JSON line per finished request
    log_stats_interval: float | None = STATS_LOG_INTERVAL_S  # the stats log line; None: off
    shutdown_timeout: float = 30.0  # --shutdown-timeout: the drain's grace for running requests
    enable_ui: bool = True  # the web console at / and /ui (--disable-ui: off)
    responses_store_max_entries: int = DEFAULT_MAX_ENTRIES  # --responses-store-max-entries
    responses_store_max_bytes: int = DEFAULT_MAX_BYTES  # --responses-store-max-bytes


def tokenmill_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tokenmill")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def needs_api_key(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/") or path == "/reset_prefix_cache"


def create_app(engine, config: ServerConfig | None = None) -> Quart:
    """The app serving `engine`; every app has its own metrics registry."""
    config = config or ServerConfig()
    app = Quart("tokenmill", static_folder=None)  # NOTE: the console serves its own files
    # NOTE: streamed responses last as long as generation does; no response timeout.
    app.config.update(
        RESPONSE_TIMEOUT=None, MAX_CONTENT_LENGTH=MAX_BODY_BYTES, BODY_TIMEOUT=BODY_TIMEOUT_S
    )
    metrics = ServingMetrics(engine)
    serving = OpenAIServing(engine, config, metrics)
    app.extensions["tokenmill"] = serving
    _register_errors(app)
    if config.api_key:
        _register_api_key(app, config.api_key)
    _register_drain_refusal(app, engine)
    _register_request_id_echo(app)
    _register_header_caps(app)
    engine.stats_listeners.append(metrics.observe_stats)
    if config.log_stats_interval:
        _register_stats_log(app, engine, config.log_stats_interval)
    _register_routes(app, engine, serving, metrics)
    store = ResponseStore(config.responses_store_max_entries, config.responses_store_max_bytes)
    register_responses_routes(app, ResponsesServing(serving, store))
    _register_stats_view(app, StatsHistory(engine, metrics))
    if config.enable_ui:
        app.register_blueprint(console_blueprint())
    secured = needs_api_key if config.api_key else None
    _register_openapi(app, openapi_document(tokenmill_version(), secured))
    return app


def _register_api_key(app: Quart, api_key: str) -> None:
    expected = f"Bearer {api_key}".encode()

    @app.before_request
    async def check_api_key():
        if not needs_api_key(request.path):
            return None
        given = request.headers.get("Authorization", "").encode()
        if hmac.compare_digest(given, expected):
            return None
        body = error_body("Invalid or missing API key.", 401, code="invalid_api_key")
        return json_response(body, 401, {"WWW-Authenticate": "Bearer"})


# NOTE: a client's X-Request-Id is only echoed (and never keys engine state: every request
# gets its own server-made id), so two requests sending the same one stay apart.
_CLIENT_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def _register_request_id_echo(app: Quart) -> None:
    @app.after_request
    async def echo_request_id(response: Response) -> Response:
        given = request.headers.get("X-Request-Id")
        if given is not None and _CLIENT_REQUEST_ID.fullmatch(given):
            response.headers["X-Request-Id"] = given
        return response


def _register_header_caps(app: Quart) -> None:
    @app.before_request
    async def refuse_oversized_headers():
        headers = list(request.headers.items())
        size = sum(len(k) + len(v) + 4 for k, v in headers)
        if len(headers) > MAX_HEADERS or size > MAX_HEADER_BYTES:
            message = (f"Request headers too large: at most {MAX_HEADERS} headers and "
                       f"{MAX_HEADER_BYTES} bytes.")  # fmt: skip
            return json_response(error_body(message, 431), 431)
        return None


def _register_drain_refusal(app: Quart, engine) -> None:
    """Shutting down: new generation requests get 503 (another replica may take them)."""

    @app.before_request
    async def refuse_while_draining():
        if request.method == "POST" and engine.draining:
            body = error_body("The server is shutting down.", 503, code="shutting_down")
            return json_response(body, 503, {"Retry-After": "1"})
        return None


def _register_stats_log(app: Quart, engine, interval: float) -> None:
    tasks = []

    @app.before_serving
    async def start_stats_log():
        tasks.append(asyncio.create_task(log_engine_stats(engine, interval)))

    @app.after_serving
    async def stop_stats_log():
        for task in tasks:
            task.cancel()


def _register_stats_view(app: Quart, history: StatsHistory) -> None:
    """`GET /v1/stats` (the console's dashboard), its samples taken once a second."""
    tasks = []

    @app.before_serving
    async def start_sampling():
        tasks.append(asyncio.create_task(history.sample_every_second()))

    @app.after_serving
    async def stop_sampling():
        for task in tasks:
            task.cancel()

    @app.get("/v1/stats")
    async def stats():
        return json_response(history.view())


def _register_errors(app: Quart) -> None:
    @app.errorhandler(ApiError)
    async def api_error(e: ApiError):
        return json_response(e.body(), e.status, e.headers())

    @app.errorhandler(HTTPException)
    async def http_error(e: HTTPException):
        status = e.code or 500
        return json_response(error_body(e.description or e.name, status), status)

    @app.errorhandler(Exception)
    async def internal_error(e: Exception):
        log.exception("request failed: %s %s", request.method, request.path)
        return json_response(error_body(f"Internal server error: {type(e).__name__}", 500), 500)


def _register_openapi(app: Quart, document: dict) -> None:
    """`GET /openapi.json`: public, like /health (`needs_api_key` leaves it out)."""
    body = msgspec.json.encode(document)

    @app.get("/openapi.json")
    async def openapi():
        return Response(body, 200, content_type="application/json")


def _register_routes(app: Quart, engine, serving: OpenAIServing, metrics: ServingMetrics) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions():
        return await serving.chat(await request.get_data(), request.headers.get("X-Feature"))

    @app.post("/v1/completions")
    async def completions():
        return await serving.completions(await request.get_data(), request.headers.get("X-Feature"))

    @app.get("/v1/models")
    async def models():
        return json_response(serving.models())

    @app.get("/v1/models/<path:model>")
    async def model(model: str):
        cards = [c for c in serving.models()["data"] if c["id"] == model]
        if not cards:
            raise ApiError(404, f"The model `{model}` does not exist.", param="model")
        return json_response(cards[0])

    @app.post("/tokenize")
    async def tokenize():
        return await serving.tokenize(await request.get_data())

    @app.post("/detokenize")
    async def detokenize():
        return await serving.detokenize(await request.get_data())

    @app.get("/health")
    async def health():
        ok, message = engine.health()
        if ok:
            return Response(b"", 200)
        return json_response(error_body(f"Engine unhealthy: {message}", 503), 503)

    @app.get("/version")
    async def version():
        return json_response({"version": tokenmill_version()})

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), 200, content_type=CONTENT_TYPE_LATEST)

    cfg = getattr(engine, "config", None)
    if getattr(cfg, "enable_lora", False) and getattr(cfg, "allow_runtime_lora_updating", False):

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter():
            return await serving.load_lora_adapter(await request.get_data())

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter():
            return await serving.unload_lora_adapter(await request.get_data())

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        ok = await engine.reset_prefix_cache()
        return json_response({"success": bool(ok)})
