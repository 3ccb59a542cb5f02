"""`slm export ollama RUN DIR`: the GGUF (and a LoRA adapter's GGUF) with a Modelfile that Ollama's
`ollama create` reads: FROM, ADAPTER, TEMPLATE for the family's chat format, SYSTEM for a template's
default system message, PARAMETER stop. llama.cpp runs the files it points to."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slmkit.adapters.lora import LoraConfig, add_lora, lora_layers
from slmkit.errors import SlmError
from slmkit.interop.hf import save_hf
from slmkit.interop.modelfile import chat_format, default_system, modelfile
from slmkit.interop.peft import save_adapter
from slmkit.jobs.export import OllamaJob, run_ollama
from slmkit.load import random_model
from slmkit.presets import get_preset

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def test_family_chat_formats_and_default_system_messages(smollm):
    assert chat_format(smollm.tokenizer.chat_template) == "chatml"
    assert default_system(smollm.tokenizer.chat_template) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    qwen = (TEMPLATES / "qwen2.5.jinja").read_text()
    assert chat_format(qwen) == "chatml" and default_system(qwen).startswith("You are Qwen, created by Alibaba Cloud")
    assert chat_format((TEMPLATES / "llama3.2.jinja").read_text()) == "llama3"
    assert chat_format("{{ messages }}") is None
    text = modelfile("model.gguf", "{{ messages }}", ["</s>"])
    assert "TEMPLATE \"\"\"" not in text and "Ollama reads the chat template stored in the GGUF" in text


def test_export_ollama_writes_a_modelfile_llama_cpp_runs(tmp_path, tiny_tokenizer):
    llamacpp = pytest.importorskip("slmkit.infer.llamacpp")
    config = get_preset("tiny").config
    base = random_model(config, seed=0)
    save_hf(base, tiny_tokenizer, tmp_path / "base")
    run_ollama(OllamaJob(str(tmp_path / "base"), str(tmp_path / "whole"), "f32"))
    lines = _lines(tmp_path / "whole" / "Modelfile")
    assert lines[0] == "FROM ./model.gguf" and not any(line.startswith("ADAPTER") for line in lines)
    assert 'TEMPLATE """{{- range $i, $_ := .Messages }}' in lines and 'PARAMETER stop "<|im_end|>"' in lines

    add_lora(base, LoraConfig(r=4, alpha=8), torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _, layer in lora_layers(base):
            layer.lora_B.weight.normal_(0, 0.05)
    save_adapter(base, tmp_path / "run", str(tmp_path / "base"), tiny_tokenizer)
    run_ollama(OllamaJob(str(tmp_path / "run"), str(tmp_path / "ollama"), "f32"))
    lines = _lines(tmp_path / "ollama" / "Modelfile")
    assert lines[:2] == ["FROM ./model.gguf", "ADAPTER ./adapter.gguf"]
    if llamacpp.available():  # the files the Modelfile names load and run in llama.cpp, the adapter over the base
        engine = llamacpp.LlamaCppEngine(tmp_path / "ollama" / "model.gguf", config, max_seq_len=64,
                                         lora=tmp_path / "ollama" / "adapter.gguf")
        assert engine.tail_logits([5, 6, 7], 1).shape == (1, config.vocab_size)
    with pytest.raises(SlmError, match="give the run"):
        run_ollama(OllamaJob(str(tmp_path / "run"), ""))
