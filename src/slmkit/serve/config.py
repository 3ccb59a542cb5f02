"""`slm serve`'s settings: what to serve, how many requests at once, and the router.

The flags of `slm serve` are generated from `ServeConfig`, and run.py, router.py take it as it is;
nothing here loads a model or opens a socket."""

from __future__ import annotations

from dataclasses import dataclass, field

from slmkit.errors import SlmError
from slmkit.runtime import Runtime

PREFIX_CACHE_MB = 256.0  # per model: the KV state of recent prompts (the scheduler's default too)
LOOKUP_TOKENS = 4  # prompt-lookup guesses verified per pass for a request decoding alone


@dataclass
class RouterConfig:
    """Hybrid routing under the model name 'auto' (off unless `route` is given)."""

    route: list[str] = field(default_factory=list, metadata={"split": False, "metavar": "SIDE=TARGET"})
    """local=MODEL and remote=URL[,model=NAME,key=ENV_VAR]: each request is answered by the local model unless the policy escalates it to the remote one (any OpenAI-compatible URL; key=ENV_VAR names the variable holding its API key)"""
    policy: str = "confidence"
    """routing policy: confidence, length, keyword, always-local, always-remote"""
    threshold: float = -1.0
    """confidence policy: escalate when the draft's mean token log-prob is below this"""
    draft_tokens: int = 32
    """confidence policy: decide after this many draft tokens (0: the whole answer)"""
    remote_timeout: float = 60.0
    """seconds to wait for the remote model"""


@dataclass
class ServeConfig:
    models: list[str] = field(default_factory=list, metadata={"split": False})
    """models to serve, each as [NAME=]MODEL (default: the bundled smollm2-135m-instruct); clients pick one by NAME in the `model` field"""
    host: str = "127.0.0.1"
    """address to bind (127.0.0.1: this machine only)"""
    port: int = 8000
    """TCP port (0..65535; 0 picks a free one)"""
    api_key: str | None = None
    """require 'Authorization: Bearer KEY' on /v1/* (default: $SLMKIT_API_KEY if set)"""
    max_batch: int = 8
    """sequences decoded together per model"""
    max_queue: int = 64
    """waiting requests per model before 429"""
    timeout: float = 300.0
    """seconds a request may take in all"""
    prefix_cache_mb: float = PREFIX_CACHE_MB
    """memory per model for the KV state of recent prompts: a request that starts like one of them (a shared system prompt, earlier chat turns) runs only its new tokens (0: off)"""
    lookup_tokens: int = LOOKUP_TOKENS
    """prompt-lookup guesses verified per pass while one request decodes alone (speculative decoding, same text; 0: off)"""
    # Batched decoding reads each weight once per step for the whole batch; on CPUs without bf16 units
    # the bf16 weights would be converted to fp32 at every multi-row step, which costs more than it saves.
    runtime: Runtime = field(default_factory=lambda: Runtime(dtype="float32"))
    """how the models run (float32 by default: the fastest batched decoding on CPUs without bf16 units)"""
    router: RouterConfig = field(default_factory=RouterConfig)
    """hybrid routing under the model name 'auto' (off unless route is given)"""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SlmError(f"port {self.port} is outside 0..65535; give a free port such as 8000")
        if self.max_batch < 1 or self.max_queue < 1:
            raise SlmError("max_batch and max_queue must be at least 1")
        if self.prefix_cache_mb < 0 or self.lookup_tokens < 0:
            raise SlmError("prefix_cache_mb and lookup_tokens must be >= 0 (0 turns each off)")


SERVE_EXAMPLES = """examples:
  slm serve                                    # the bundled model on http://127.0.0.1:8000 (chat page at /)
  slm serve small=runs/student/best big=smollm2-135m-instruct --api-key secret
  slm serve --route local=runs/student/best --route remote=http://127.0.0.1:8001/v1,model=smollm2-135m-instruct

Routing serves the model name 'auto': each request is answered by the local model unless the
policy escalates it to the remote one (any OpenAI-compatible URL; key=ENV_VAR names the variable
holding its API key). The answer's `slmkit_route` field and `x-slmkit-route` header say what happened.
"""
