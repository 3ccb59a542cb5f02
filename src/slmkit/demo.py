"""`slm demo` (`make demo`): the guided tour on the bundled SmolLM2-135M-Instruct.

Step 1 loads the GGUF and prints its model card; step 2 answers three fixed prompts through the
chat template, streaming, with tokens/s for each; step 3 distills a small student from it on the
shared TinyStories sample (`demo_distill.py`); step 4 LoRA-tunes it on Symptom2Disease and shows
accuracy and hallucination before and after on held-out rows (`demo_finetune.py`).
"""

from __future__ import annotations

import sys
import time

import torch

from slmkit.card import console, print_card
from slmkit.demo_distill import distill_step
from slmkit.demo_finetune import finetune_step
from slmkit.generate import TextGenerator
from slmkit.infer.sampling import SamplingParams
from slmkit.load import load
from slmkit.presets import DEFAULT_MODEL

PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about a small computer.",
    "Give three tips for saving energy at home.",
)


def run_demo(model: str = DEFAULT_MODEL, max_tokens: int = 96) -> int:
    console.rule("[bold]1. load the bundled model")
    start = time.perf_counter()
    loaded = load(model, dtype=torch.bfloat16)
    console.print(f"loaded {loaded.source.path} in {time.perf_counter() - start:.1f}s "
                  f"(weights held in bfloat16, {torch.get_num_threads()} threads)")
    print_card(loaded.source)

    console.rule("[bold]2. chat: three fixed prompts, greedy decoding")
    gen = TextGenerator(loaded.model, loaded.tokenizer)
    params = SamplingParams(max_new_tokens=max_tokens)
    speeds = []
    for prompt in PROMPTS:
        console.print(f"[bold cyan]user>[/] {prompt}")
        sys.stdout.write("assistant> ")
        result = gen.chat([{"role": "user", "content": prompt}], params,
                          on_text=lambda _row, text: (sys.stdout.write(text), sys.stdout.flush()))
        g = result.generation
        speeds.append(g.decode_tokens_per_second)
        console.print(f"\n[dim]  {result.prompt_tokens} prompt tokens in {g.prefill_seconds:.2f}s, "
                      f"{result.completion_tokens} new tokens at {g.decode_tokens_per_second:.1f} tokens/s[/]")
    console.rule("[bold]summary")
    console.print(f"decode speed: {', '.join(f'{s:.1f}' for s in speeds)} tokens/s "
                  f"(bfloat16 weights, batch 1, {torch.get_num_threads()} threads)")

    console.rule("[bold]3. distill a small student from this model")
    distill_step()

    console.rule("[bold]4. fine-tune it for a task: LoRA on Symptom2Disease")
    finetune_step()
    return 0
