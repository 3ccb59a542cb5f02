"""`slm serve`: load the models, build the app (and the router), run uvicorn."""

from __future__ import annotations

import os
from pathlib import Path

from slmkit.errors import SlmError
from slmkit.presets import DEFAULT_MODEL


def parse_model_specs(specs: list[str]) -> dict[str, str]:
    """["NAME=MODEL" or "MODEL", ...] -> {name: model}; a bare MODEL is named after its file or preset."""
    out: dict[str, str] = {}
    for spec in specs or [DEFAULT_MODEL]:
        name, _, model = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        name = name or Path(model.rstrip("/")).name.removesuffix(".gguf")
        if name in out or name == "auto":
            raise SlmError(f"two served models would be called '{name}'; name them: slm serve NAME=MODEL ...")
        out[name] = model
    return out


def load_backend(name: str, model: str, args):
    import torch

    from slmkit.load import load
    from slmkit.serve.backend import LocalBackend

    loaded = load(model, dtype=getattr(torch, args.dtype))
    return LocalBackend(name, loaded.model, loaded.tokenizer, args.max_batch, args.max_queue, args.context)


def build_backends(args) -> dict:
    backends = {}
    if args.route:
        from slmkit.serve.router import build_router

        router = build_router(args, lambda name, model: load_backend(name, model, args))
        backends.update(router.local_backends())
        backends["auto"] = router
    if args.models or not args.route:
        for name, model in parse_model_specs(args.models).items():
            if name not in backends:
                backends[name] = load_backend(name, model, args)
    return backends


def serve(args) -> int:
    import uvicorn

    from slmkit.serve.app import create_app

    api_key = args.api_key or os.environ.get("SLMKIT_API_KEY") or None
    backends = build_backends(args)
    app = create_app(backends, api_key=api_key, timeout=args.timeout)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach it can use it")
    print(f"serving {', '.join(backends)} on http://{args.host}:{args.port}  (chat page: /, API: /v1, "
          f"metrics: /metrics)")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        for backend in backends.values():
            close = getattr(backend, "close", None)
            if close:
                close()
    return 0
