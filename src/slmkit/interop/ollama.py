"""Models already pulled by Ollama, by name: `ollama:qwen3:0.6b` -> the GGUF blob in its store.

Ollama keeps each model as a manifest (`manifests/registry.ollama.ai/<namespace>/<name>/<tag>`,
JSON) whose layer of media type `application/vnd.ollama.image.model` names a content-addressed blob
(`blobs/sha256-<hex>`): a plain GGUF file, which slmkit reads like any other. The store is
`$OLLAMA_MODELS`, else `~/.ollama/models` (a user install) or `/usr/share/ollama/.ollama/models`
(the Linux service). Nothing is downloaded: a model Ollama has not pulled is an error that says so.
Other runners keep plain `.gguf` files (LM Studio under `~/.lmstudio/models`, llama.cpp under
`~/.cache/llama.cpp`), which are given by path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from slmkit.errors import SlmError

PREFIX = "ollama:"
MODEL_LAYER = "application/vnd.ollama.image.model"
REGISTRY = "registry.ollama.ai"


def stores() -> list[Path]:
    if os.environ.get("OLLAMA_MODELS"):
        return [Path(os.environ["OLLAMA_MODELS"]).expanduser()]
    return [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]


def ollama_gguf(spec: str) -> Path:
    """The GGUF blob of `ollama:[namespace/]name[:tag]` (tag `latest` when not given)."""
    name, _, tag = spec.removeprefix(PREFIX).partition(":")
    if not name:
        raise SlmError(f"'{spec}' names no model; write ollama:NAME[:TAG], e.g. ollama:qwen3:0.6b")
    namespace, _, model = name.rpartition("/")
    tried = []
    for store in stores():
        manifest = store / "manifests" / REGISTRY / (namespace or "library") / model / (tag or "latest")
        tried.append(str(manifest))
        if manifest.is_file():
            return _model_blob(store, manifest, spec)
    raise SlmError(f"Ollama has not pulled '{spec.removeprefix(PREFIX)}' (no manifest at {' or '.join(tried)}); "
                   f"run `ollama pull {spec.removeprefix(PREFIX)}` or set OLLAMA_MODELS to its store")


def _model_blob(store: Path, manifest: Path, spec: str) -> Path:
    try:
        layers = json.loads(manifest.read_text()).get("layers", [])
    except (OSError, json.JSONDecodeError) as err:
        raise SlmError(f"the Ollama manifest '{manifest}' is unreadable: {err}") from err
    digest = next((layer.get("digest", "") for layer in layers if layer.get("mediaType") == MODEL_LAYER), "")
    if not digest.startswith("sha256:"):
        raise SlmError(f"the Ollama manifest of '{spec}' has no model layer (media type {MODEL_LAYER})")
    blob = store / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise SlmError(f"the model blob of '{spec}' is missing from the Ollama store ({blob}); pull it again")
    return blob
