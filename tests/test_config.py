"""Typed configs: dicts and YAML in, unknown keys and wrong types out, `a.b=value` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from slmkit.config import ModelConfig, apply_overrides, from_dict, load_config
from slmkit.errors import SlmError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class Run:
    name: str = "run"
    steps: int = 10
    optim: Optim = field(default_factory=Optim)
    model: ModelConfig | None = None


def test_nested_dataclasses_from_dict():
    run = from_dict(Run, {"steps": 5, "optim": {"lr": 1}, "model": {"hidden_size": 32, "num_attention_heads": 4}})
    assert run.optim.lr == 1.0 and isinstance(run.optim.lr, float)
    assert run.model.hidden_size == 32


def test_unknown_key_is_an_error_with_a_suggestion():
    with pytest.raises(SlmError, match="Did you mean: steps"):
        from_dict(Run, {"stpes": 3})


def test_wrong_type_is_an_error():
    with pytest.raises(SlmError, match="steps"):
        from_dict(Run, {"steps": "many"})


def test_overrides_parse_values_as_yaml(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("# a recipe\nsteps: 3\noptim:\n  lr: 0.1\n")
    run = load_config(Run, file, ["optim.lr=3e-4", "name=exp1", "optim.betas=[0.8, 0.9]"])
    assert (run.steps, run.optim.lr, run.name, run.optim.betas) == (3, 3e-4, "exp1", [0.8, 0.9])


def test_malformed_override():
    with pytest.raises(SlmError, match="key=value"):
        apply_overrides({}, ["steps"])


def test_model_config_validates_head_grouping():
    with pytest.raises(SlmError, match="key/value groups"):
        ModelConfig(num_attention_heads=9, num_key_value_heads=2)
    with pytest.raises(SlmError, match="block_repeats"):
        ModelConfig(num_hidden_layers=5, block_repeats=2)
