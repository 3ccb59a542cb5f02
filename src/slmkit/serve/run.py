"""`slm serve`: load the models, build the app (and the router), run uvicorn."""

from __future__ import annotations

import os
from pathlib import Path

from slmkit.serve.config import ServeConfig

LLAMACPP_SERVE_CONTEXT = 2048  # default tokens per request on the llama.cpp engine (see load_backend)


class ModelPool:
    """Loads each model once: adapters over the same base share that base's weights (one copy in
    memory, whatever the number of adapters), and a base served by its own name is that copy too."""

    def __init__(self, dtype):
        self.dtype, self.loaded = dtype, {}

    def get(self, spec: str):
        """(model, tokenizer) of MODEL; an adapter directory gets its own module tree over the shared base."""
        from slmkit.adapters.merge import with_adapter_copy
        from slmkit.interop.peft import attach_adapter, is_adapter_dir, read_adapter
        from slmkit.load import find_base
        from slmkit.tokenizer import Tokenizer

        if not is_adapter_dir(Path(spec)):
            base = self._base(spec)
            return base.model, base.tokenizer
        adapter = read_adapter(spec)
        base = self._base(find_base(adapter))
        model = with_adapter_copy(base.model)
        attach_adapter(model, adapter)
        tokenizer = Tokenizer.from_dir(spec) if (Path(spec) / "tokenizer.json").is_file() else base.tokenizer
        return model.eval(), tokenizer

    def _base(self, spec: str):
        from slmkit.load import load, resolve

        key = str(resolve(spec))
        if key not in self.loaded:
            self.loaded[key] = load(spec, dtype=self.dtype)
        return self.loaded[key]


def load_backend(name: str, model: str, cfg: ServeConfig, pool: ModelPool | None = None):
    import torch

    from slmkit.infer.llamacpp import LlamaCppEngine, choose_engine, runtime_files
    from slmkit.serve.backend import LocalBackend
    from slmkit.serve.runners import LlamaCppRunner

    if choose_engine(cfg.engine, model) == "llamacpp":
        files = runtime_files(model, cfg.gguf_type)
        # llama.cpp reserves every sequence's KV cache up front: a model's full context (8k for SmolLM2)
        # times 8-32 sequences would take gigabytes, so a request gets 2048 tokens unless --context says
        context = cfg.context or min(files.config.max_position_embeddings, LLAMACPP_SERVE_CONTEXT)
        engine = LlamaCppEngine.for_files(files, context, threads=cfg.threads, sequences=cfg.max_batch)
        return LocalBackend(name, LlamaCppRunner(engine), files.tokenizer, cfg.max_batch, cfg.max_queue, context)
    pool = pool or ModelPool(getattr(torch, cfg.dtype))
    weights, tokenizer = pool.get(model)
    return LocalBackend(name, weights, tokenizer, cfg.max_batch, cfg.max_queue, cfg.context)


def build_backends(cfg: ServeConfig) -> dict:
    import torch

    from slmkit.serve.backend import parse_model_specs

    backends, pool = {}, ModelPool(getattr(torch, cfg.dtype))
    if cfg.router.route:
        from slmkit.serve.router import build_router

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
    import uvicorn

    from slmkit.serve.app import create_app

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
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
