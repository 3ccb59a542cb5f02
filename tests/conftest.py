"""Shared fixtures: the bundled SmolLM2 (loaded once), its transformers twin, tiny random models."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# llama.cpp exports made by the tests go to a throwaway cache, not the user's ~/.cache/slmkit
os.environ.setdefault("SLMKIT_CACHE", tempfile.mkdtemp(prefix="slmkit-test-cache-"))

# Said by every llama.cpp test that skips on a machine without the extra (CI installs it: .ci/run).
LLAMA_CPP_MISSING = "llama-cpp-python is not installed: pip install -e '.[llamacpp]' (builds llama.cpp; CI has it)"



def _llama_cpp_without_amx_buffers() -> None:
    """The tests that drive llama-cpp-python's own `Llama` (the peer) get the setting our engine uses on
    AMX CPUs: llama.cpp's AMX weight buffers crash its worker threads there (infer/llamacpp.py)."""
    try:
        from llama_cpp import llama_cpp as low_level
    except ImportError:
        return
    from slmkit.layers import cpu_flags

    if "amx_int8" not in cpu_flags():
        return
    default = low_level.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = without_extra_buffers


_llama_cpp_without_amx_buffers()

# The shared data sets live beside the checkout (../shared/data); SLMKIT_DATA_DIR points elsewhere.
DATA = Path(os.environ.get("SLMKIT_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M-Instruct from the bundled GGUF, fp32 (the parity reference precision)."""
    from slmkit.load import load

    return load("smollm2-135m-instruct", dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_smollm():
    """transformers' own GGUF loader on the same file, weights dequantized to fp32."""
    transformers = pytest.importorskip("transformers")
    from transformers.utils.quantization_config import GgufConfig

    from slmkit.load import bundled_gguf

    path = bundled_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


@pytest.fixture
def tiny_model():
    """A random tiny GQA model (fp32) for fast engine tests."""
    from slmkit.load import random_model
    from slmkit.presets import get_preset

    return random_model(get_preset("tiny").config, seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A throwaway byte-level BPE trained in-process (GPT-2 pre-tokenizer, ChatML special tokens)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, trainers

    from slmkit.tokenizer import CHATML_TEMPLATE, Tokenizer, make_pre_tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = make_pre_tokenizer("gpt-2")
    backend.decoder = decoders.ByteLevel()
    from tokenizers import pre_tokenizers

    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["Once upon a time there was a little robot who liked to count: 1, 2, 3, 42, 1000."] * 50
    backend.train_from_iterator(text, trainer)
    return Tokenizer(backend, bos_token_id=1, eos_token_id=2, pad_token_id=0, chat_template=CHATML_TEMPLATE,
                     pre="gpt-2")


@pytest.fixture(scope="session")
def story_docs(data_dir) -> list[str]:
    from slmkit.data.readers import read_documents

    return list(read_documents(data_dir / "corpus" / "tinystories" / "tinystories_train_sample.txt"))[:400]


@pytest.fixture(scope="session")
def story_tokenizer_dir(tmp_path_factory, story_docs):
    """A 512-token BPE trained in-process on 400 TinyStories."""
    from slmkit.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(story_docs, 512, show_progress=False).save(path)
    return path


@pytest.fixture(scope="session")
def story_data(tmp_path_factory, story_docs, story_tokenizer_dir):
    """400 TinyStories prepared into shards with the 512-token tokenizer."""
    from slmkit.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("stories")
    corpus = root / "stories.txt"
    corpus.write_text("\n<|endoftext|>\n".join(story_docs))
    out = root / "prepared"
    prepare(PrepareConfig(inputs=[str(corpus)], out=str(out), tokenizer=str(story_tokenizer_dir)), log=lambda *_: None)
    return out
