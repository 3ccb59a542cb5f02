"""The hybrid router behind the model name "auto": answer locally unless a policy escalates.

Policies (`--policy`):
    confidence     draft locally; escalate when the draft's mean token log-probability after
                   `draft_tokens` tokens (0: the whole answer) is below `threshold`
    keyword        escalate prompts that look like math or code (a small regex rule set)
    length         escalate only prompts that do not fit the local context
    always-local / always-remote    for comparison
Every policy but always-local escalates a prompt longer than the local context. When the remote
fails or is slow (no answer within its timeout), the local model answers and the route says so;
nothing waits past the request timeout.

Each answer carries `slmkit_route = {"decision", "reason", "confidence", "fallback"}` (and the
`x-slmkit-route` header); `/metrics` counts decisions by reason.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

from slmkit.errors import SlmError
from slmkit.serve.backend import LocalBackend, Prompt, Settings, parse_model_specs
from slmkit.serve.config import RouterConfig
from slmkit.serve.protocol import ApiError
from slmkit.serve.remote import RemoteBackend, RemoteFailed

POLICIES = ("confidence", "keyword", "length", "always-local", "always-remote")

# Hard categories for the keyword policy: arithmetic and word problems, and programming.
HARD_PATTERNS = {
    "math": re.compile(r"\d+\s*[-+*/^×÷]\s*\d+|\b(calculate|compute|solve|equation|integral|derivative|"
                       r"how many|how much|percent|sum of|product of)\b", re.IGNORECASE),
    "code": re.compile(r"```|\bdef |\bclass |\b(python|javascript|function|code|program|compile|regex|sql|"
                       r"algorithm)\b", re.IGNORECASE),
}


class Router:
    def __init__(self, local: LocalBackend, remote: RemoteBackend, policy: str = "confidence",
                 threshold: float = -1.0, draft_tokens: int = 32, metrics=None):
        check_policy(policy, draft_tokens)
        self.local, self.remote, self.policy = local, remote, policy
        self.threshold, self.draft_tokens = threshold, draft_tokens
        self.metrics = metrics  # set by the app: counts decisions
        self.name = "auto"

    @property
    def scheduler(self):  # /metrics reports the local model's queue under "auto" too
        return self.local.scheduler

    def local_backends(self) -> dict:
        return {self.local.name: self.local}

    def start(self, prompt: Prompt, settings: Settings) -> RouterRun:
        if prompt.tools:
            raise ApiError(400, f"the router does not route tool calls; send them to the local model "
                           f"'{self.local.name}'", param="tools")
        ids = self.local.encode(prompt)
        fits = bool(ids) and len(ids) + (settings.max_tokens or 1) <= self.local.context
        if self.policy == "always-local":
            self.local.check(ids, settings)  # a 400 when it does not fit: this policy never escalates
            return RouterRun(self, prompt, settings, ids, "local", "always-local")
        if not fits:
            return RouterRun(self, prompt, settings, ids, "remote", "prompt longer than the local context")
        if self.policy == "always-remote":
            return RouterRun(self, prompt, settings, ids, "remote", "always-remote")
        if self.policy == "keyword":
            hit = hard_category(prompt)
            return RouterRun(self, prompt, settings, ids, "remote" if hit else "local",
                             f"keyword: {hit}" if hit else "keyword: none")
        if self.policy == "length":
            return RouterRun(self, prompt, settings, ids, "local", "fits the local context")
        return RouterRun(self, prompt, settings, ids, "draft", "confidence")

    def close(self) -> None:
        pass  # the local backend is closed as a served model of its own


def check_policy(policy: str, draft_tokens: int) -> None:
    if policy not in POLICIES:
        raise SlmError(f"routing policy '{policy}' is unknown (choose from {', '.join(POLICIES)})")
    if draft_tokens < 0:
        raise SlmError("--draft-tokens must be >= 0 (0: judge the whole answer)")


def hard_category(prompt: Prompt) -> str | None:
    """"math" or "code" when the prompt's user text matches the rules, else None."""
    if prompt.messages is not None:
        text = "\n".join(m["content"] for m in prompt.messages if m["role"] == "user")
    else:
        text = prompt.text or ""
    return next((name for name, pattern in HARD_PATTERNS.items() if pattern.search(text)), None)


def mean_logprob(logprobs: list[float]) -> float:
    """The confidence signal: mean log-probability of the generated tokens (0 when none)."""
    finite = [lp for lp in logprobs if math.isfinite(lp)]
    return sum(finite) / len(finite) if finite else 0.0


class RouterRun:
    def __init__(self, router: Router, prompt: Prompt, settings: Settings, ids: list[int], plan: str, reason: str):
        self.router, self.prompt, self.settings, self.ids = router, prompt, settings, ids
        self.plan, self.reason = plan, reason
        self.prompt_text = prompt.text or ""
        self.answered_by = router.local.name if plan != "remote" else router.remote.name
        self.route: dict | None = None
        self._active = None

    def _decide(self, decision: str, reason: str, confidence: float | None = None, fallback: bool = False) -> None:
        self.route = {"decision": decision, "reason": reason, "confidence": confidence, "fallback": fallback}
        self.answered_by = self.router.local.name if decision == "local" else self.router.remote.name
        if self.router.metrics is not None:
            self.router.metrics.decision(decision, "fallback" if fallback else reason.split(":")[0])

    async def events(self):
        if self.plan == "local":
            self._decide("local", self.reason)
            async for item in self._local(self.settings):
                yield item
        elif self.plan == "remote":
            async for item in self._remote_or_local(self.reason, None):
                yield item
        else:
            async for item in self._draft():
                yield item

    async def _local(self, settings: Settings):
        run = self.router.local.start(self.prompt, settings)
        self._active = run
        async for item in run.events():
            yield item

    async def _remote_or_local(self, reason: str, confidence: float | None):
        """Escalate; if the remote fails before it has said anything, answer locally instead."""
        run = self.router.remote.start(self.prompt, self.settings)
        self._active, started = run, False
        try:
            async for item in run.events():
                if not started:
                    self._decide("remote", reason, confidence)
                    self.answered_by = run.answered_by
                    started = True
                yield item
            if not started:
                raise RemoteFailed("the remote sent no answer")
        except RemoteFailed as error:
            if started:  # part of the answer is out: end it with an error rather than mix two models
                raise ApiError(502, f"the remote failed mid-answer: {error}", type="server_error") from None
            self._decide("local", f"{reason}; remote failed ({error})", confidence, fallback=True)
            async for item in self._local(self.settings):
                yield item

    async def _draft(self):
        """Generate locally with log-probs; after the draft, keep going locally or escalate."""
        wanted = self.settings.top_logprobs
        settings = replace(self.settings, top_logprobs=0 if wanted is None else wanted)
        run = self.router.local.start(self.prompt, settings)
        self._active = run
        stream = run.events()
        buffered, logprobs, open_choices = [], [], self.settings.n
        async for index, event in stream:
            buffered.append((index, event))
            if event.kind == "text":
                logprobs += [t.logprob for t in event.tokens]
            open_choices -= event.kind in ("done", "error")
            if not open_choices or (self.router.draft_tokens and len(logprobs) >= self.router.draft_tokens * self.settings.n):
                break
        confidence = round(mean_logprob(logprobs), 4)
        verdict = f"confidence {confidence} {'<' if confidence < self.router.threshold else '>='} " \
                  f"{self.router.threshold}"
        if confidence < self.router.threshold:
            await stream.aclose()  # frees the draft's batch slots
            async for item in self._remote_or_local(verdict, confidence):
                yield item
            return
        self._decide("local", verdict, confidence)
        for item in buffered:
            yield item
        if open_choices:
            async for item in stream:
                yield item

    async def aclose(self) -> None:
        if self._active is not None:
            await self._active.aclose()


def build_router(cfg: RouterConfig, load_local) -> Router:
    """From `--route local=MODEL --route remote=URL[,model=NAME,key=ENV]` and the policy settings."""
    sides = {}
    for spec in cfg.route:
        side, _, target = spec.partition("=")
        if side not in ("local", "remote") or not target:
            raise SlmError(f"--route {spec}: expected local=MODEL or remote=URL[,model=NAME,key=ENV_VAR]")
        sides[side] = target
    if set(sides) != {"local", "remote"}:
        raise SlmError("routing needs both --route local=MODEL and --route remote=URL")
    [(name, model)] = parse_model_specs([sides["local"]]).items()
    remote = RemoteBackend.from_spec(sides["remote"], cfg.remote_timeout)
    check_policy(cfg.policy, cfg.draft_tokens)  # before the (slow) load of the local model
    return Router(load_local(name, model), remote, cfg.policy, cfg.threshold, cfg.draft_tokens)
