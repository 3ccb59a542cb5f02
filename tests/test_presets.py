"""Presets reproduce the published parameter counts; `slm size` memory arithmetic."""

from __future__ import annotations

import pytest

from slmkit.errors import SlmError
from slmkit.presets import PRESETS, get_preset
from slmkit.sizing import count_params, kv_cache_bytes, weight_bytes

PUBLISHED = [name for name, p in PRESETS.items() if p.published_params]


def test_every_family_the_issue_names_is_a_preset():
    expected = {"smollm2-135m", "smollm2-360m", "smollm2-1.7b", "tinyllama-1.1b", "qwen2-0.5b", "qwen2-1.5b",
                "llama-3.2-1b", "llama-3.2-3b", "phi-3-mini", "mistral-7b", "mixtral-8x7b", "openelm-270m",
                "qwen2.5-0.5b", "qwen3-0.6b", "gemma-3-270m", "gemma-3-1b", "phi-3.5-mini", "phi-4-mini", "smollm3-3b",
                "olmo-2-1b", "granite-3.3-2b"}
    assert expected <= set(PUBLISHED)


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_count_matches_published_within_one_percent(name):
    preset = PRESETS[name]
    ours = count_params(preset.config).total
    assert abs(ours / preset.published_params - 1) < 0.01, f"{name}: {ours:,} vs {preset.published_params:,}"


def test_mixtral_active_parameters():
    counts = count_params(get_preset("mixtral-8x7b").config)
    assert 12.5e9 < counts.active < 13.0e9  # "12.9B active" in Mistral's announcement


def test_mistral_7b_at_4_bits_needs_about_4_gb():
    params = count_params(get_preset("mistral-7b").config).total
    assert 3.8e9 < weight_bytes(params, 4) < 4.2e9
    assert weight_bytes(params, 16) == params * 2


def test_kv_cache_bytes_smollm2():
    # 30 layers x 2 (k, v) x 3 kv heads x 64 dims x 2 bytes = 23,040 bytes per token
    assert kv_cache_bytes(get_preset("smollm2-135m").config, context=1000) == 23_040_000


def test_sliding_window_bounds_the_kv_cache():
    config = get_preset("mistral-7b").config
    assert kv_cache_bytes(config, 32768) == kv_cache_bytes(config, 4096)


def test_unknown_preset_suggests_close_names():
    with pytest.raises(SlmError, match="Did you mean: smollm2-135m"):
        get_preset("smolm2-135m")
