"""`slm synth`: a teacher writes a training corpus (sequence-level distillation, synthetic data).

TinyStories (Eldan & Li, 2023) had a large model write stories for small children, each prompt
asking for three random words (a verb, a noun, an adjective) and a random set of story features,
so the corpus spreads over the vocabulary and plot space instead of retelling the model's favourite
story. `prompts="tinystories"` builds such prompts; a file gives one instruction per line (.txt)
or per record (.jsonl/.csv/.parquet, `text_field`), e.g. the shared Self-Instruct seeds.

The answers pass the quality filters of `slm prepare` and exact + MinHash de-duplication, and are
written as JSON lines {"text", "prompt"} (atomically, with a report). Sequence-level KD works
across tokenizers: prepare the output with the student's tokenizer and pretrain on it.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from slmkit.data.dedup import DedupReport, exact_dedup, near_dedup
from slmkit.data.filters import FilterConfig, first_failure
from slmkit.data.readers import expand_inputs, read_documents
from slmkit.errors import SlmError
from slmkit.fileio import write_text
from slmkit.generate import TextGenerator
from slmkit.infer.sampling import SamplingParams
from slmkit.load import load
from slmkit.presets import DEFAULT_MODEL

VERBS = ("jump", "run", "share", "build", "find", "hide", "climb", "fly", "help", "paint", "sing", "dance",
         "swim", "bake", "hug", "laugh", "cry", "dig", "throw", "catch", "listen", "whisper", "fix", "grow",
         "explore", "wait", "borrow", "race", "kick", "count", "carry", "search", "rescue", "knock", "shout")
NOUNS = ("ball", "dog", "tree", "boat", "cake", "moon", "garden", "box", "kite", "bird", "river", "hat",
         "train", "castle", "flower", "key", "rain", "cookie", "shell", "lamp", "bear", "drum", "rock",
         "bridge", "owl", "map", "sock", "puddle", "cloud", "apple", "rabbit", "blanket", "star", "bucket",
         "truck", "frog", "window", "pond", "candle", "button")
ADJECTIVES = ("happy", "tiny", "brave", "shiny", "sleepy", "kind", "loud", "soft", "funny", "red", "curious",
              "gentle", "hungry", "silly", "cold", "bright", "proud", "scared", "wet", "fast", "quiet",
              "big", "sad", "warm", "fluffy", "clever", "lonely", "strong", "messy", "friendly")
FEATURES = ("the story should contain at least one dialogue",
            "something unexpected should happen or there should be a plot twist",
            "the story should have a bad ending",
            "the story should teach a moral value",
            "the story should have a conflict that the characters solve",
            "the narrative should use foreshadowing")
TINYSTORIES_TEMPLATE = ('Write a short story (3-5 paragraphs) which only uses very simple words that a 3 year '
                        'old child would understand. The story should use the verb "{verb}", the noun "{noun}" '
                        'and the adjective "{adjective}".{features} Remember to only use simple words!')


@dataclass
class SynthConfig:
    teacher: str = DEFAULT_MODEL
    """The model that writes: a GGUF file, an HF directory or the bundled model."""
    prompts: str = "tinystories"
    """tinystories (random words and features, as in the TinyStories paper) or a file of instructions."""
    text_field: str = "instruction"
    """Field of .jsonl/.csv/.parquet prompt records."""
    count: int = 100
    """Documents to generate (before filtering and de-duplication)."""
    out: str = "data/synth.jsonl"
    """Output .jsonl file."""
    batch_size: int = 8
    """Prompts decoded together."""
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(
        max_new_tokens=320, temperature=0.8, top_p=0.95, repetition_penalty=1.1, seed=0))
    """How the teacher samples (temperature 0: every repeat of a prompt gives the same text; a repetition
    penalty > 1 breaks the loops small models fall into). Its seed also orders the prompts."""
    system: str = ""
    """Optional system message for chat models."""
    near_threshold: float = 0.8
    """Estimated Jaccard similarity at which two outputs count as near duplicates."""
    filters: FilterConfig = field(default_factory=FilterConfig)


def tinystories_prompt(rng: random.Random) -> str:
    features = rng.sample(FEATURES, rng.randint(0, 2))
    feature_text = "".join(f" In the story, {f}." for f in features)
    return TINYSTORIES_TEMPLATE.format(verb=rng.choice(VERBS), noun=rng.choice(NOUNS),
                                       adjective=rng.choice(ADJECTIVES), features=feature_text)


def make_prompts(cfg: SynthConfig) -> list[str]:
    """`cfg.count` prompts, reproducible from the seed (file prompts are cycled in a shuffled order)."""
    rng = random.Random(cfg.sampling.seed or 0)
    if cfg.prompts == "tinystories":
        return [tinystories_prompt(rng) for _ in range(cfg.count)]

    seeds = [d.strip() for f in expand_inputs([cfg.prompts]) for d in read_documents(f, cfg.text_field, "\n")]
    seeds = [s for s in seeds if s]
    if not seeds:
        raise SlmError(f"'{cfg.prompts}' holds no prompts (one per line, or records with field '{cfg.text_field}')")
    rng.shuffle(seeds)
    return [seeds[i % len(seeds)] for i in range(cfg.count)]


def synthesize(cfg: SynthConfig, log=print) -> dict:
    """Generate, filter, de-duplicate and write the corpus; returns the report."""
    if cfg.count < 1 or cfg.batch_size < 1:
        raise SlmError("count and batch_size must be at least 1")
    prompts = make_prompts(cfg)
    loaded = load(cfg.teacher)
    gen = TextGenerator(loaded.model, loaded.tokenizer)
    texts, started = [], time.perf_counter()
    with tqdm(total=len(prompts), desc="synth", unit="doc", dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), cfg.batch_size):
            batch = prompts[start:start + cfg.batch_size]
            params = replace(cfg.sampling, seed=(cfg.sampling.seed or 0) * 1_000_003 + start)  # a seed per batch
            rendered = [_render(loaded.tokenizer, cfg.system, p) for p in batch]
            texts += [c.text.strip() for c in gen.complete(rendered, params)]
            bar.update(len(batch))
    report = _clean_and_write(cfg, prompts, texts)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def _render(tokenizer, system: str, prompt: str) -> str:
    if not tokenizer.chat_template:
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _clean_and_write(cfg: SynthConfig, prompts: list[str], texts: list[str]) -> dict:
    dropped: dict[str, int] = {}
    kept = []
    for i, text in enumerate(texts):
        failure = first_failure(text, cfg.filters)
        if failure:
            dropped[failure] = dropped.get(failure, 0) + 1
        else:
            kept.append(i)
    dedup = DedupReport()
    unique = set(exact_dedup([texts[i] for i in kept], dedup))
    kept = [i for j, i in enumerate(kept) if j in unique]
    kept = near_dedup(texts, kept, dedup, cfg.near_threshold) if kept else kept
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, "".join(json.dumps({"text": texts[i], "prompt": prompts[i]}) + "\n" for i in kept))
    return {"generated": len(texts), "filtered": dropped, "exact_duplicates": dedup.exact_removed,
            "near_duplicates": dedup.near_removed, "kept": len(kept), "out": str(out)}


def print_report(report: dict) -> None:
    filtered = ", ".join(f"{k} {v}" for k, v in report["filtered"].items()) or "none"
    print(f"generated {report['generated']} documents in {report['seconds']}s; dropped by filters: {filtered}; "
          f"exact duplicates {report['exact_duplicates']}, near duplicates {report['near_duplicates']}; "
          f"wrote {report['kept']} to {report['out']}")
