"""`slm serve`: load the models, build the app (and the router), run uvicorn."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import uvicorn

from slmkit.infer.llamacpp import LlamaCppEngine, choose_engine, runtime_files
from slmkit.interop.peft import is_adapter_dir, read_adapter
from slmkit.load import Loaded, find_base, load, over_base, resolve
from slmkit.runtime import use_threads
from slmkit.serve.app import create_app
from slmkit.serve.backend import LocalBackend, parse_model_specs
from slmkit.serve.config import ServeConfig
from slmkit.serve.router import build_router
from slmkit.serve.runners import LlamaCppRunner

LLAMACPP_SERVE_CONTEXT = 2048  # default tokens per request on the llama.cpp engine (see load_backend)


class ModelPool:
    """Loads each model once: adapters over the same base share that base's weights (one copy in
    memory, whatever the number of adapters), and a base served by its own name is that copy too."""

    def __init__(self, dtype):
        self.dtype, self.loaded = dtype, {}

    def get(self, spec: str):
        """(model, tokenizer) of MODEL; an adapter directory gets its own module tree over the shared base."""
        if not is_adapter_dir(Path(spec)):
            base = self._base(spec)
            return base.model, base.tokenizer
        adapter = read_adapter(spec)
        return over_base(adapter, self._base(find_base(adapter)), share=True)

    def _base(self, spec: str) -> Loaded:
        key = str(resolve(spec))
        if key not in self.loaded:
            self.loaded[key] = load(spec, dtype=self.dtype)
        return self.loaded[key]


def load_backend(name: str, model: str, cfg: ServeConfig, pool: ModelPool | None = None):
    r = cfg.runtime
    if choose_engine(r.engine, model) == "llamacpp":
        files = runtime_files(model, r.gguf_type)
        # llama.cpp reserves every sequence's KV cache up front: a model's full context (8k for SmolLM2)
        # times 8-32 sequences would take gigabytes, so a request gets 2048 tokens unless --context says
        context = r.context or min(files.config.max_position_embeddings, LLAMACPP_SERVE_CONTEXT)
        engine = LlamaCppEngine.for_files(files, context, threads=r.threads, sequences=cfg.max_batch)
        return LocalBackend(name, LlamaCppRunner(engine), files.tokenizer, cfg.max_batch, cfg.max_queue, context,
                            cfg.prefix_cache_mb, cfg.lookup_tokens)
    pool = pool or ModelPool(getattr(torch, r.dtype))
    weights, tokenizer = pool.get(model)
    return LocalBackend(name, weights, tokenizer, cfg.max_batch, cfg.max_queue, r.context, cfg.prefix_cache_mb,
                        cfg.lookup_tokens)


def build_backends(cfg: ServeConfig) -> dict:
    backends, pool = {}, ModelPool(getattr(torch, cfg.runtime.dtype))
    if cfg.router.route:
        router = build_router(cfg.router, lambda name, model: load_backend(name, model, cfg, pool))
        backends.update(router.local_backends())
        backends["auto"] = router
    if cfg.models or not cfg.router.route:
        for name, model in parse_model_specs(cfg.models).items():
            if name not in backends:
                backends[name] = load_backend(name, model, cfg, pool)
    return backends


def serve(cfg: ServeConfig) -> int:
    """Serve until interrupted; every backend is closed on the way out."""
    use_threads(cfg.runtime.threads)
    api_key = cfg.api_key or os.environ.get("SLMKIT_API_KEY") or None
    backends = build_backends(cfg)
    app = create_app(backends, api_key=api_key, timeout=cfg.timeout)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: listening on {cfg.host} without an API key: anyone who can reach it can use it")
    print(f"serving {', '.join(backends)} on http://{cfg.host}:{cfg.port}  (chat page: /, API: /v1, "
          f"metrics: /metrics)")
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        for backend in backends.values():
            close = getattr(backend, "close", None)
            if close:
                close()
    return 0
