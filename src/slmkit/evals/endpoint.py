"""Score a model behind an OpenAI-compatible server the same way as a local one (`--endpoint URL`).

Log-likelihoods use the completions API the way lm-evaluation-harness's `local-completions` model
does: POST /v1/completions with the context + continuation as the prompt, `echo: true`,
`max_tokens: 0` and `logprobs: 1`; the continuation's tokens are those whose text offset is at or
after the context's length, and it is "greedy" when each of them is its position's top token.
Servers that do not return prompt log-probabilities (OpenAI's own API no longer does) can still
run the generation tasks (GSM8K, HumanEval). Only the standard library is used: no SDK needed.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tqdm import tqdm

from slmkit.errors import SlmError
from slmkit.evals.lm import ROUND_NATS, LoglikelihoodRequest, Score, move_trailing_spaces


class EndpointLM:
    def __init__(self, url: str, model: str = "default", api_key: str | None = None, timeout: float = 600.0):
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.batch_size = 1

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps({"model": self.model, **body}).encode(),
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:300]
            raise SlmError(f"{self.url}{path} answered {err.code}: {detail}") from None
        except urllib.error.URLError as err:
            raise SlmError(f"cannot reach {self.url}: {err.reason} (is the server running?)") from None

    def loglikelihood(self, requests: list[LoglikelihoodRequest], progress: bool = True) -> list[Score]:
        scores = []
        for r in tqdm(requests, desc="log-likelihoods", unit="req", disable=not progress, leave=False):
            context, continuation = move_trailing_spaces(r.context, r.continuation)
            answer = self._post("/completions", {"prompt": context + continuation, "echo": True, "max_tokens": 0,
                                                 "logprobs": 1, "temperature": 0.0})
            scores.append(_score_echo(answer, len(context)))
        return scores

    def generate_until(self, prompts: list[str], until: list[str], max_new_tokens: int,
                       progress: bool = True) -> list[tuple[str, bool]]:
        outputs = []
        for prompt in tqdm(prompts, desc="generating", unit="doc", disable=not progress, leave=False):
            answer = self._post("/completions", {"prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0.0,
                                                 "stop": list(until)[:4]})  # the API takes at most 4 stops
            outputs.append((_cut(answer["choices"][0]["text"], until), False))
        return outputs


def _cut(text: str, until: list[str]) -> str:
    """Servers take at most 4 stop strings: the rest are applied here."""
    cut = min((text.find(s) for s in until if s and s in text), default=len(text))
    return text[:cut]


def _score_echo(answer: dict, context_chars: int) -> Score:
    try:
        lp = answer["choices"][0]["logprobs"]
        tokens, logprobs, offsets = lp["tokens"], lp["token_logprobs"], lp["text_offset"]
        top = lp.get("top_logprobs") or [None] * len(tokens)
    except (KeyError, IndexError, TypeError):
        raise SlmError("the endpoint did not return prompt log-probabilities (echo + logprobs); multiple-choice "
                       "tasks need them, generation tasks (gsm8k, humaneval) do not") from None
    picked = [i for i, offset in enumerate(offsets) if offset >= context_chars]
    if not picked or any(logprobs[i] is None for i in picked):
        raise SlmError("the endpoint returned no log-probability for the continuation's tokens")
    total = sum(logprobs[i] for i in picked)
    greedy = all(top[i] is not None and max(top[i].values()) <= logprobs[i] + 1e-6 for i in picked)
    return Score(round(total / ROUND_NATS) * ROUND_NATS, greedy, len(picked), False)
