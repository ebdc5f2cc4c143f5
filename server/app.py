"""App factory: `create_app(ServerConfig)` -> FastAPI app with thin OpenAI-compatible routes.

Models load in a background thread started by the lifespan, so /health can answer 503
while loading; nothing is parsed or loaded at import time.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P
from .config import ServerConfig
from .metrics import Metrics
from .middleware import BodyLimit, RequestCounter
from engine.runner import load_model
from .context import ServingContext, default_profiles
from .errors import APIError
from .serving_chat import ChatServing
from .serving_completion import CompletionServing

log = logging.getLogger("server")
STATIC = Path(__file__).resolve().parent / "static"
# The page fetches nothing but this server: scripts, styles and API calls from the same origin.
UI_HEADERS = {"Content-Security-Policy": "default-src 'self'; style-src 'self'; script-src 'self'; "
                                         "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
              "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


class AppState:
    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.metrics = Metrics()
        self.profiles = default_profiles(cfg, self.metrics)  # before loading: /profile answers meanwhile
        self.serving: ServingContext | None = None
        self.chat: ChatServing | None = None
        self.completion: CompletionServing | None = None
        self.load_error: str | None = None

    def load(self) -> None:
        try:
            if self.cfg.threads:
                torch.set_num_threads(self.cfg.threads)
            t0 = time.perf_counter()
            models = self._load_models()
            if self.cfg.compile:
                self._compile(models)
            memory = None
            if self.cfg.memory_model:
                from memory_model.condense import MemoryModel

                memory = MemoryModel(self.cfg.memory_model, quant=self.cfg.memory_model_quant)
                if self.cfg.compile:
                    self._compile_memory(memory)
            ctx = ServingContext.create(models, self.cfg, self.metrics, memory, self.profiles)
            self.chat, self.completion = ChatServing(ctx), CompletionServing(ctx)
            self.serving = ctx  # last: requests are admitted once everything above exists
            log.info("loaded %s in %.1fs", ", ".join(models), time.perf_counter() - t0)
        except Exception as e:  # surfaced on /health and on every request
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("model load failed: %s", self.load_error)

    def _load_models(self) -> dict:
        """Every artifact by name, the primary first, with the LoRA adapters over its weights;
        then each adapter as a model name of its own (a view sharing the primary's weights)."""
        models, adapters = {}, self.cfg.adapter_paths()
        for name, path in self.cfg.model_paths().items():
            models[name] = load_model(path, name, self.cfg.max_model_len, self.cfg.verify_checksums,
                                      adapters=None if models else adapters)
        if not models:
            raise ValueError("no artifact configured")
        primary = next(iter(models.values()))
        for name in adapters:
            models[name] = primary.with_adapter(name, name)
        return models

    def _compile(self, models: dict) -> None:
        """Compile each model's decode step before requests are admitted (the first user does
        not wait for it). An adapter's name shares its base model, whose warm-up compiles the
        adapter's graphs too."""
        from engine.compiled import CompiledDecode

        for name, lm in models.items():
            if lm.adapter is None and CompiledDecode.supports(lm.model):
                s = CompiledDecode(lm.model).warm_up(self.cfg.max_num_seqs)
                self.metrics.compile_seconds.labels(name).set(s)
                log.info("compiled %s's decode step in %.1fs", name, s)

    def _compile_memory(self, memory) -> None:
        """Compile the memory model's prompt-lookup draft checks (server/hybrid.py `Condenser`:
        every condensation is written that way) and its one-token step (a step where no row found
        a draft), so the first hybrid request does not wait."""
        from engine.compiled import CompiledDecode

        from .hybrid import Condenser

        if CompiledDecode.supports(memory.model):
            decode = CompiledDecode(memory.model)
            s = decode.warm_up_checks(self.cfg.max_num_seqs, 1 + Condenser.LOOKUP_DRAFT)
            s += decode.warm_up(self.cfg.max_num_seqs)
            self.metrics.compile_seconds.labels(f"memory-model:{memory.name}").set(s)
            log.info("compiled memory model %s's draft checks and decode step in %.1fs", memory.name, s)


def _error(status: int, message: str, type: str = "invalid_request_error", param=None, code=None, headers=None):
    return JSONResponse(P.ErrorResponse(error=P.ErrorDetail(message=message, type=type, param=param, code=code))
                        .model_dump(), status_code=status, headers=headers)


def create_app(cfg: ServerConfig, state: AppState | None = None) -> FastAPI:
    """`state`: one that has already loaded (a Ray Serve replica loads before it reports ready);
    otherwise the lifespan loads in the background and /health says 503 meanwhile."""
    state = state or AppState(cfg)

    async def lifespan(app: FastAPI):
        if state.serving is None and state.load_error is None:
            threading.Thread(target=state.load, name="model-loader", daemon=True).start()
        yield
        if state.serving is not None:
            state.serving.scheduler.shutdown()

    app = FastAPI(title="hybrid-llm", lifespan=lifespan)
    app.state.hybrid = state

    def serving() -> ServingContext:
        if state.load_error:
            raise APIError(503, f"model failed to load: {state.load_error}", type="server_error", code="load_failed")
        if state.serving is None:
            raise APIError(503, "model is still loading", type="server_error", code="loading",
                           headers={"Retry-After": str(cfg.retry_after_s)})
        return state.serving

    def authorize(request: Request) -> None:
        if not cfg.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Compare against every key without short-circuit so timing reveals nothing.
        ok = False
        for key in cfg.api_keys:
            ok |= hmac.compare_digest(token.strip().encode(), key.encode())
        if scheme.lower() != "bearer" or not ok:
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return _error(400, f"request body is not valid JSON: {first.get('msg')}", code="invalid_json")
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body') or 'body'}: {er.get('msg')}"
                        for er in errs[:5])
        return _error(400, f"invalid request: {msg}", param=".".join(loc) or None, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(e.status_code, str(e.detail), type=kind,
                      code="request_too_large" if e.status_code == 413 else None)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(e).__name__}", type="server_error")

    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_mb * 2**20)
    app.add_middleware(RequestCounter, metrics=state.metrics)  # added last = outermost: counts the 413s too

    @app.get("/health")
    async def health():
        if state.load_error:
            return JSONResponse({"status": "error", "message": state.load_error}, status_code=503)
        if state.serving is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        state.profiles.refresh()  # auto: a scrape sees the current power source
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return serving().model_list()

    @app.get("/profile", dependencies=[Depends(authorize)])
    async def get_profile():
        return state.profiles.describe()

    @app.post("/profile", dependencies=[Depends(authorize)])
    async def set_profile(req: P.ProfileRequest):
        state.profiles.set_mode(req.mode)
        log.info("power profile mode set to %s (active: %s)", req.mode, state.profiles.active.name)
        return state.profiles.describe()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(req: P.ChatCompletionRequest, request: Request):
        serving()  # 503 while loading
        return await state.chat.create(req, request)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(req: P.CompletionRequest, request: Request):
        serving()  # 503 while loading
        return await state.completion.create(req, request)

    if cfg.ui:  # the page itself needs no key; its API calls send the one typed into it
        @app.get("/", include_in_schema=False)
        async def index():
            return FileResponse(STATIC / "index.html", headers=UI_HEADERS)

        app.mount("/ui", StaticFiles(directory=STATIC), name="ui")

    return app
