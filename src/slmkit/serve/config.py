"""`slm serve`'s settings: what to serve, how many requests at once, and the router.

The flags of `slm serve` are generated from `ServeConfig`, and run.py, router.py take it as it is;
nothing here loads a model or opens a socket."""

from __future__ import annotations

from dataclasses import dataclass, field

from slmkit.errors import SlmError


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
    # Batched decoding reads each weight once per step for the whole batch; on CPUs without bf16 units
    # the bf16 weights would be converted to fp32 at every multi-row step, which costs more than it saves.
    dtype: str = field(default="float32", metadata={"choices": ("bfloat16", "float32")})
    """weight precision in memory (float32: fastest batched decoding on CPUs without bf16 units; bfloat16: half the memory)"""
    threads: int | None = None
    """CPU threads (default: all cores)"""
    context: int | None = None
    """maximum tokens per request, prompt included (default: the model's own limit; 2048 on the llama.cpp engine, which reserves every sequence's cache up front)"""
    engine: str = field(default="auto", metadata={"choices": ("auto", "torch", "llamacpp")})
    """llamacpp exports each model to GGUF once (cached) and decodes in llama.cpp, ~4x faster on a CPU; torch is slmkit's PyTorch engine (the reference); auto: llamacpp when installed and the model exports to GGUF"""
    gguf_type: str = field(default="q8_0", metadata={"choices": ("q8_0", "q4_0", "q4_k_m", "f16")})
    """GGUF type of the export the llamacpp engine runs (a GGUF model runs as it is)"""
    router: RouterConfig = field(default_factory=RouterConfig)
    """hybrid routing under the model name 'auto' (off unless route is given)"""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SlmError(f"port {self.port} is outside 0..65535; give a free port such as 8000")
        if self.max_batch < 1 or self.max_queue < 1:
            raise SlmError("max_batch and max_queue must be at least 1")
