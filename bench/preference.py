"""Preference-tuning benchmark: DPO and ORPO (LoRA and full) on on-policy SciTLDR pairs, each
against the supervised model it starts from, on test abstracts no run trained or tuned on.

    python bench/preference.py [--sft-rows 400] [--pair-rows 160] [--test-rows 96] [--reuse]

1. SFT: LoRA on the first --sft-rows SciTLDR training abstracts (one pass), merged: the start of
   every preference run (and DPO's reference).
2. On-policy pairs from validation abstracts with two or more reference TLDRs: the SFT model's own
   greedy summary is the rejected answer and the first reference the chosen one, kept where the
   SFT summary's ROUGE-L against the *other* references is below the chosen one's.
3. dpo / orpo x lora / full on those pairs (one pass; 10% of them held out for validation), each
   in its own process (time, peak RSS), validation reward accuracy from its last evaluation.
4. The judge, stated before any run: on the first --test-rows test abstracts (the built-in split's
   order), each model's greedy summary scored by ROUGE-L F1 against the references (best of
   them, `slm eval --data`); a run wins a row when its score is higher than the SFT model's, a tie
   counts half. Win rate = (wins + ties / 2) / rows.
Writes bench/results/preference.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from decode import cpu_name  # noqa: E402

RUNS = ROOT / "runs" / "bench-preference"
OUT = ROOT / "bench" / "results" / "preference.json"
SLM = [sys.executable, "-m", "slmkit.cli"]
# one pass over the pairs; learning rates of the usual ranges (TRL's examples: full 5e-7..5e-6, LoRA ~1e-5..1e-4)
RUNS_TO_MEASURE = {("dpo", "lora"): 1e-4, ("orpo", "lora"): 1e-4, ("dpo", "full"): 5e-6, ("orpo", "full"): 5e-6}
MAX_NEW_TOKENS = 64


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run a command; (wall seconds, peak RSS MiB) measured by GNU time."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, int(done.stderr.strip().splitlines()[-1]) / 1024


def sft(rows: int, reuse: bool) -> Path:
    merged = RUNS / "sft-merged"
    if reuse and (merged / "config.json").is_file():
        return merged
    run = RUNS / "sft"
    subprocess.run(["rm", "-rf", str(run), str(merged)], check=True)
    timed(SLM + ["finetune", "--config", "configs/finetune/scitldr-lora.yaml", f"out={run}", "epochs=1",
                 f"data.max_train_rows={rows}", "data.max_val_rows=40", "train.eval_every=0",
                 "train.early_stopping_patience=0", "train.seq_len=512"])
    timed(SLM + ["merge", "smollm2-135m-instruct", str(run), "-o", str(merged), "--dtype", "float32"])
    return merged


def on_policy_pairs(model: Path, rows: int, reuse: bool) -> tuple[Path, dict]:
    """Pairs where the SFT model's own summary loses to the first reference (judged by the others)."""
    import torch
    from rouge_score.rouge_scorer import RougeScorer

    from slmkit.data.tasks import task_data
    from slmkit.generate import TextGenerator
    from slmkit.infer.sampling import SamplingParams
    from slmkit.load import load

    path = RUNS / "pairs.jsonl"
    if reuse and path.is_file():
        return path, json.loads((RUNS / "pairs.json").read_text())
    examples = [e for e in task_data("scitldr").val if len(e.references) >= 2][:rows]
    loaded = load(str(model), dtype=torch.float32)
    generator = TextGenerator(loaded.model, loaded.tokenizer)
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
    prompts = [loaded.tokenizer.apply_chat_template(e.messages[:-1], add_generation_prompt=True) for e in examples]
    answers = []
    for i in range(0, len(prompts), 8):
        answers += [c.text.strip() for c in generator.complete(prompts[i:i + 8], params, truncate=True)]
    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    best = lambda text, refs: max(scorer.score(r, text)["rougeL"].fmeasure for r in refs)  # noqa: E731
    pairs = []
    for e, answer in zip(examples, answers):
        chosen, others = e.references[0], e.references[1:]
        if answer and answer != chosen and best(answer, others) < best(chosen, others):
            pairs.append({"prompt": e.messages[:-1], "chosen": [{"role": "assistant", "content": chosen}],
                          "rejected": [{"role": "assistant", "content": answer}]})
    RUNS.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    info = {"abstracts": len(examples), "pairs": len(pairs)}
    (RUNS / "pairs.json").write_text(json.dumps(info))
    return path, info


def preference_run(base: Path, pairs: Path, method: str, adapter: str, lr: float, reuse: bool) -> dict:
    out = RUNS / f"{method}-{adapter}"
    if reuse and (out / "result.json").is_file():
        return json.loads((out / "result.json").read_text())
    subprocess.run(["rm", "-rf", str(out)], check=True)
    wall, peak = timed(SLM + ["finetune", "--method", method, "--base", str(base), f"data.train={pairs}",
                              "data.val_fraction=0.1", f"preference.adapter={adapter}", "preference.beta=0.1",
                              "epochs=1", "train.micro_batch_size=4", "train.seq_len=512", f"train.lr={lr}",
                              f"train.min_lr={lr / 10}", "train.warmup_steps=3", "train.eval_every=10",
                              "train.early_stopping_patience=0", "train.checkpoint_every=20", f"out={out}"])
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    result = {"method": method, "adapter": adapter, "lr": lr, "wall_s": wall, "peak_rss_mib": peak,
              "steps": evals[-1]["step"] if evals else None,
              "val_reward_accuracy": evals[-1].get("val_reward_accuracy") if evals else None,
              "val_reward_margin": evals[-1].get("val_reward_margin") if evals else None}
    (out / "result.json").write_text(json.dumps(result))
    return result


def test_file(rows: int) -> Path:
    """The first `rows` test abstracts in the built-in task's evaluation order, as `slm eval --data` rows."""
    from slmkit.evals.api import default_data_dir
    from slmkit.evals.tasks import make_task

    task = make_task("scitldr", default_data_dir())
    path = RUNS / "test.jsonl"
    path.write_text("".join(json.dumps({"messages": d["example"].messages[:-1], "references": d["example"].references})
                            + "\n" for d in task.eval_docs().rows[:rows]))
    return path


def scores(model: Path, data: Path, name: str, reuse: bool) -> list[float]:
    """Per-row ROUGE-L of the model's greedy summaries (slm eval --data's answers file)."""
    out = RUNS / f"eval-{name}.json"
    answers = out.with_suffix(".answers.jsonl")
    if not (reuse and answers.is_file()):
        timed(SLM + ["eval", str(model), "--data", str(data), "--data-kind", "generation",
                     "--data-max-tokens", str(MAX_NEW_TOKENS), "-o", str(out)])
    return [json.loads(line)["rougeL"] for line in answers.read_text().splitlines()]


def win_rate(ours: list[float], theirs: list[float]) -> float:
    wins = sum(a > b for a, b in zip(ours, theirs)) + 0.5 * sum(a == b for a, b in zip(ours, theirs))
    return wins / len(ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-rows", type=int, default=400)
    parser.add_argument("--pair-rows", type=int, default=160)
    parser.add_argument("--test-rows", type=int, default=96)
    parser.add_argument("--only", default=",".join(f"{m}-{a}" for m, a in RUNS_TO_MEASURE))
    parser.add_argument("--reuse", action="store_true", help="keep finished steps under runs/bench-preference")
    args = parser.parse_args()
    os.chdir(ROOT)
    base = sft(args.sft_rows, args.reuse)
    pairs, pair_info = on_policy_pairs(base, args.pair_rows, args.reuse)
    data = test_file(args.test_rows)
    reference = scores(base, data, "sft", args.reuse)
    rows = []
    for (method, adapter), lr in RUNS_TO_MEASURE.items():
        if f"{method}-{adapter}" not in args.only.split(","):
            continue
        result = preference_run(base, pairs, method, adapter, lr, args.reuse)
        mine = scores(RUNS / f"{method}-{adapter}", data, f"{method}-{adapter}", args.reuse)
        result.update(test_rougeL=sum(mine) / len(mine), win_rate_vs_sft=win_rate(mine, reference))
        rows.append(result)
    doc = {"benchmark": "preference", "machine": cpu_name(), "date": time.strftime("%Y-%m-%d"),
           "sft_rows": args.sft_rows, **pair_info, "test_rows": args.test_rows,
           "sft_test_rougeL": sum(reference) / len(reference), "judge": "ROUGE-L F1 vs the references (best), "
           "per test abstract; a win is a higher score than the SFT model's, a tie counts half", "runs": rows}
    OUT.write_text(json.dumps(doc, indent=1))
    print(f"SFT ({args.sft_rows} rows) test ROUGE-L {doc['sft_test_rougeL']:.4f}; {pair_info['pairs']} on-policy pairs "
          f"from {pair_info['abstracts']} abstracts; {args.test_rows} test abstracts")
    print(f"{'run':<12}{'win rate':>10}{'ROUGE-L':>10}{'val acc':>9}{'time s':>8}{'peak MiB':>10}")
    for r in rows:
        acc = r["val_reward_accuracy"]
        print(f"{r['method'] + '-' + r['adapter']:<12}{r['win_rate_vs_sft']:>10.3f}{r['test_rougeL']:>10.4f}"
              f"{(acc if acc is not None else float('nan')):>9.3f}{r['wall_s']:>8.0f}{r['peak_rss_mib']:>10.0f}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
