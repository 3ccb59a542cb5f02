"""Preference tuning losses (DPO, ORPO) over the one training loop, as TRL defines them.

A batch holds m pairs as 2m rows (chosen rows, then rejected rows; `data.preference`). A row's
log-probability is the sum of its answer tokens' log-probabilities (the prompt is context only),
computed with logits at the answer positions only.

DPO (Rafailov et al. 2023; TRL's `loss_type="sigmoid"`):
    chosen_reward   = beta * (logp_chosen - ref_logp_chosen)      (likewise rejected)
    loss            = -logsigmoid(chosen_reward - rejected_reward), mean over pairs
The reference is the model before training, frozen. Its log-probabilities are computed once,
before the first step (`reference_logps`), and kept in the run directory: with LoRA that model is
the base without the adapter (B = 0 at init), with full fine-tuning the base itself, so no second
copy of the model is ever held in memory, and a resumed run reads them back.

ORPO (Hong et al. 2024; TRL's ORPOTrainer), reference-free:
    p_c, p_r        = the mean log-probability per answer token of each side
    log_odds        = (p_c - p_r) - (log(1 - e^p_c) - log(1 - e^p_r))
    loss            = NLL(chosen rows) - beta * mean(logsigmoid(log_odds))
where, as TRL computes it, the NLL is the mean next-token loss over the chosen rows' whole
sequences (prompt and answer: the model also keeps modelling the prompts it is tuned on)
    rewards         = beta * p_c, beta * p_r
Both log reward accuracy (chosen reward above rejected) and the mean margin.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from slmkit.data.preference import PreferenceBatches
from slmkit.data.sft_batches import IGNORE
from slmkit.errors import SlmError
from slmkit.fileio import atomic_write

OBJECTIVES = ("dpo", "orpo")


def answer_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed answer log-probabilities (rows,), answer token counts (rows,)) of a batch."""
    answer = batch["targets"] != IGNORE  # (rows, T)
    token, rows = kept_logps(model, batch["input_ids"], batch["targets"], answer)
    return _row_sums(token, rows, answer.shape[0]), answer.sum(1)


def kept_logps(model, input_ids: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each kept position's target (N,), its row (N,)), with logits computed at
    the kept positions only (`keep`, (rows, T))."""
    logits = model(input_ids, logits_to_keep=keep)  # (N, V)
    token = torch.log_softmax(logits.float(), -1).gather(-1, targets[keep][:, None])[:, 0]
    return token, keep.nonzero()[:, 0]


def _row_sums(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, rows, values)


def dpo_terms(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """Per-pair DPO losses and the logged rewards; policy/reference (2m,) summed log-probabilities."""
    m = policy.shape[0] // 2
    rewards = beta * (policy - reference)
    chosen, rejected = rewards[:m], rewards[m:]
    return -F.logsigmoid(chosen - rejected), _reward_logs(chosen, rejected)


def orpo_terms(sums: torch.Tensor, counts: torch.Tensor, nll: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """The ORPO loss (a scalar: `nll` minus beta times the mean log-odds term); sums/counts (2m,) of
    the answers' log-probabilities and tokens, `nll` the chosen rows' mean next-token loss."""
    m = sums.shape[0] // 2
    mean = sums / counts.clamp(min=1)
    p_c, p_r = mean[:m], mean[m:]
    log_odds = (p_c - p_r) - (log1mexp(p_c) - log1mexp(p_r))
    ratio = F.logsigmoid(log_odds)
    logs = _reward_logs(beta * p_c, beta * p_r)
    logs.update(nll=nll.item(), log_odds=log_odds.mean().item())
    return nll - beta * ratio.mean(), logs


def orpo_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(answer log-probability sums (rows,), answer token counts (rows,), the chosen rows' NLL). As in
    TRL's ORPOTrainer, the NLL covers the chosen rows' whole sequences, prompt included (`all_targets`),
    so logits are computed there and at the rejected answers' positions only."""
    targets, every = batch["targets"], batch["all_targets"]
    m = targets.shape[0] // 2
    chosen_rows = torch.zeros_like(targets, dtype=torch.bool)
    chosen_rows[:m] = True
    answer = targets != IGNORE
    keep = answer | (chosen_rows & (every != IGNORE))  # (rows, T)
    token, rows = kept_logps(model, batch["input_ids"], every, keep)  # an answer's target is its `every` target
    in_answer = answer[keep]
    nll = -token[chosen_rows[keep]].mean()
    return _row_sums(token[in_answer], rows[in_answer], targets.shape[0]), answer.sum(1), nll


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable at both ends (Maechler 2012: expm1 near 0, log1p far from it)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _reward_logs(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    return {"reward_chosen": chosen.mean().item(), "reward_rejected": rejected.mean().item(),
            "reward_accuracy": (chosen > rejected).float().mean().item(),
            "reward_margin": (chosen - rejected).mean().item()}


def preference_loss(objective: str, beta: float) -> Callable:
    """The loop's loss function for `objective` (dpo needs the batch's `ref_logps`)."""
    if objective not in OBJECTIVES:
        raise SlmError(f"unknown preference objective '{objective}' (choose from {', '.join(OBJECTIVES)})")
    if beta <= 0:
        raise SlmError(f"preference.beta must be > 0, got {beta}")

    def loss_fn(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if objective == "orpo":
            return orpo_terms(*orpo_logps(model, batch), beta)
        sums, _ = answer_logps(model, batch)
        losses, logs = dpo_terms(sums, batch["ref_logps"].to(sums.device), beta)
        return losses.mean(), logs

    return loss_fn


@torch.no_grad()
def reference_logps(model, data: PreferenceBatches, run: Path, name: str, batch_pairs: int, amp,
                    progress: bool = True) -> torch.Tensor:
    """(pairs, 2) log-probabilities of every pair's chosen and rejected answer under the model as
    it is now (before training: the reference). Kept in RUN/reference_logps_NAME.safetensors with
    a fingerprint of the pairs' tokens, so a resumed run reads them back (and other pairs do not)."""
    file = run / f"reference_logps_{name}.safetensors"
    fingerprint = pairs_fingerprint(data)
    if file.is_file():
        with safe_open(str(file), "pt") as f:
            if (f.metadata() or {}).get("pairs") == fingerprint:
                return f.get_tensor("logps")
    was_training = model.training
    model.eval()  # no dropout: the reference is a fixed function
    out = torch.zeros(len(data.pairs), 2)
    device = next(model.parameters()).device
    for indices in tqdm(data.all_batches(batch_pairs), desc=f"reference log-probs ({name})", unit="batch",
                        disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in data.rows(indices).items()}
        with amp:
            sums, _ = answer_logps(model, batch)
        out[indices] = torch.stack([sums[: len(indices)], sums[len(indices):]], 1).float().cpu()
    model.train(was_training)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write(file, lambda tmp: save_file({"logps": out}, str(tmp), metadata={"pairs": fingerprint}))
    return out


def pairs_fingerprint(data: PreferenceBatches) -> str:
    digest = hashlib.sha256()
    for pair in data.pairs:
        for side in (pair.chosen, pair.rejected):
            digest.update(json.dumps([side.ids, side.trained]).encode())
    return digest.hexdigest()


def preference_validation(objective: str, beta: float, data: PreferenceBatches, batch_pairs: int) -> Callable:
    """The loop's validation: the preference loss and the reward accuracy and margin over every
    validation pair (its reference log-probabilities computed before training)."""
    loss_fn = preference_loss(objective, beta)

    @torch.no_grad()
    def validate(forward, model, amp, device) -> dict[str, float]:
        model.eval()
        totals: dict[str, float] = {}
        for indices in data.all_batches(batch_pairs):
            batch = {k: v.to(device) for k, v in data.rows(indices).items()}
            with amp:
                loss, logs = loss_fn(forward, batch)
            for key, value in {"val_loss": loss.item(), **{f"val_{k}": v for k, v in logs.items()}}.items():
                totals[key] = totals.get(key, 0.0) + value * len(indices)
        model.train()
        return {k: v / len(data.pairs) for k, v in totals.items()}

    return validate
