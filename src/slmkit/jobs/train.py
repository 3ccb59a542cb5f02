"""`slm pretrain`, `slm distill` and `slm finetune`: run the recipe its config describes (resuming
when `resume` says so) and say where the results are. The recipes themselves live in train/."""

from __future__ import annotations

from slmkit.train import dist
from slmkit.train.adapt import FinetuneConfig
from slmkit.train.distill import DistillConfig
from slmkit.train.distill import run as distill
from slmkit.train.finetune import run as finetune
from slmkit.train.loop import TrainResult
from slmkit.train.pretrain import PretrainConfig
from slmkit.train.pretrain import run as pretrain


def run_pretrain(cfg: PretrainConfig) -> None:
    _report(_run(pretrain, cfg), "model")


def run_distill(cfg: DistillConfig) -> None:
    _report(_run(distill, cfg), "student")


def run_finetune(cfg: FinetuneConfig) -> None:
    result = _run(finetune, cfg)
    _report(result, "the model", str(result.run_dir))


def _run(recipe, cfg) -> TrainResult:
    try:
        return recipe(cfg, resume=cfg.resume)
    finally:
        dist.teardown()


def _report(result: TrainResult, what: str, where: str | None = None) -> None:
    s = result.state
    best = f", best validation loss {s.best_val_loss:.4f} at step {s.best_step}" if s.best_val_loss else ""
    print(f"stopped ({result.stop_reason}) at step {s.step} after {s.tokens:,} tokens{best}; "
          f"{what} in {where or result.run_dir / 'final'}, curves in {result.run_dir / 'loss.png'}")
