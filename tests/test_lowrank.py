"""Low-rank factorization: exact at full rank, whitening beats plain SVD on the layer's outputs,
the rank formula, sensitivity ranks, checkpoints, GGUF refusal and --densify, bad input."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from slmkit.cli import main
from slmkit.compress.lowrank import (
    LowRankConfig,
    allocate_ranks,
    break_even_rank,
    densify,
    factorize_model,
    max_rank,
    measure_energy,
    output_energy,
    rank_for,
    svd_factors,
    whitened_factors,
)
from slmkit.errors import SlmError
from slmkit.interop.gguf import write_gguf
from slmkit.interop.hf import save_checkpoint
from slmkit.layers import LowRankLinear
from slmkit.load import load, random_model
from slmkit.presets import get_preset


def _tiny(seed: int = 0, **changes):
    return random_model(replace(get_preset("tiny").config, **changes), seed=seed)


def _correlated_inputs(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """Activations with a few large channels and correlated columns, like a transformer's (full rank)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k // 4, generator=g) @ torch.randn(k // 4, k, generator=g)
    x += 0.1 * torch.randn(rows, k, generator=g)
    x[:, :4] *= 20  # outlier channels
    return x


def _ids(n: int = 4, t: int = 32, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


# -- one linear -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(48, 64), (64, 40)])
def test_full_rank_factors_reproduce_the_layer(n, k):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(k, n, bias=True)
    x = _correlated_inputs(256, k)
    xtx = x.T @ x / x.shape[0]
    for up, down in (svd_factors(linear.weight, min(n, k)), whitened_factors(linear.weight, xtx, min(n, k))):
        assert up.shape == (n, min(n, k)) and down.shape == (min(n, k), k)
        torch.testing.assert_close(up @ down, linear.weight.detach(), rtol=1e-4, atol=1e-5)
        layer = LowRankLinear.from_factors(up, down, linear.bias.detach())
        probe = torch.randn(3, 5, k, generator=g)
        torch.testing.assert_close(layer(probe), linear(probe), rtol=1e-4, atol=1e-5)


def test_whitened_has_lower_output_error_than_plain_svd_at_the_same_rank():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    x = _correlated_inputs(1024, 96)
    xtx = x.T @ x / x.shape[0]
    errors = {}
    for rank in (8, 24):
        for name, (up, down) in {"svd": svd_factors(w, rank), "whitened": whitened_factors(w, xtx, rank)}.items():
            errors[name, rank] = ((x @ w.T - x @ (up @ down).T).norm() / (x @ w.T).norm()).item()
        assert errors["whitened", rank] < 0.7 * errors["svd", rank], errors
        # the whitened truncation error is exactly the dropped share of output energy
        dropped = sum(output_energy(w, xtx, "whitened")[rank:])
        assert errors["whitened", rank] ** 2 == pytest.approx(dropped, rel=1e-3)


def test_whitening_survives_a_singular_x_t_x():
    x = _correlated_inputs(256, 32)
    x[:, 5] = 0  # a dead channel: X^T X is singular and needs the ridge
    w = torch.randn(16, 32)
    up, down = whitened_factors(w, x.T @ x / 256, 16)
    torch.testing.assert_close(up @ down, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,k", [(576, 576), (1536, 576), (64, 32), (49152, 576)])
@pytest.mark.parametrize("keep", [0.2, 0.5, 0.8, 0.99])
def test_rank_formula_keeps_the_asked_share_of_parameters(n, k, keep):
    r = rank_for(n, k, keep)
    assert r * (n + k) <= keep * n * k < (r + 1) * (n + k)  # the largest rank within the share
    assert r <= max_rank(n, k) < break_even_rank(n, k) and max_rank(n, k) * (n + k) < n * k


def test_sensitivity_gives_ranks_where_the_outputs_need_them_within_the_budget():
    shapes = {"flat": (64, 64), "peaked": (64, 64)}
    energy = {"flat": [1 / 64] * 64, "peaked": [0.9] + [0.1 / 63] * 63}
    uniform = {name: rank_for(64, 64, 0.5) for name in shapes}  # 16 each
    ranks = allocate_ranks(energy, shapes, uniform)
    assert ranks["flat"] > uniform["flat"] > ranks["peaked"] >= 8  # the floor: half the uniform rank
    assert sum(r * 128 for r in ranks.values()) <= sum(r * 128 for r in uniform.values())


# -- a model --------------------------------------------------------------------------------------


def test_uniform_factorization_records_ranks_and_parameter_counts():
    model = _tiny()
    report = factorize_model(model, LowRankConfig(method="svd", keep=0.5), progress=False)
    assert len(report.ranks) == 14 and report.params_after <= 0.5 * report.params_before
    assert model.config.lowrank["ranks"]["model.layers.0.self_attn.q_proj"] == rank_for(64, 64, 0.5)
    assert isinstance(model.model.layers[1].mlp.down_proj, LowRankLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tied head is left alone by default
    assert "14 linears factorized" in report.summary()


def test_sensitivity_ranks_spend_no_more_than_uniform_and_lower_the_summed_error():
    cfg = LowRankConfig(method="whitened", keep=0.5, ranks="sensitivity", calib_samples=4, calib_seq_len=32)
    uniform = factorize_model(_tiny(), replace(cfg, ranks="uniform"), _ids(), progress=False)
    sensitive = factorize_model(_tiny(), cfg, _ids(), progress=False)
    assert sensitive.params_after <= uniform.params_after
    assert len(set(sensitive.ranks.values())) > len(set(uniform.ranks.values()))
    energy = measure_energy(_tiny(), cfg, _ids(), list(uniform.ranks), progress=False)  # what the allocation saw

    def dropped(ranks):  # summed relative output error of the truncations
        return sum(sum(energy[name][r:]) for name, r in ranks.items())

    assert dropped(sensitive.ranks) < 0.95 * dropped(uniform.ranks)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model = _tiny(tie_word_embeddings=True)
    cfg = LowRankConfig(method="whitened", keep=0.6, targets=["q_proj", "down_proj", "lm_head"])
    report = factorize_model(model, cfg, _ids(), progress=False)
    assert "lm_head" in report.ranks and model.config.tie_word_embeddings is False
    save_checkpoint(model, None, tmp_path / "lr")
    assert not (tmp_path / "lr.partial").exists()
    loaded = load(str(tmp_path / "lr"), dtype=torch.float32).model
    ids = _ids(2, 16)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    factorized = {name: m.rank for name, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert factorized == report.ranks
    assert loaded.config.lowrank == model.config.lowrank


def test_gguf_export_refuses_a_factorized_model_until_densified(tmp_path, tiny_tokenizer):
    model = _tiny(vocab_size=tiny_tokenizer.vocab_size, tie_word_embeddings=True)
    factorize_model(model, LowRankConfig(method="svd", keep=0.7), progress=False)
    with pytest.raises(SlmError, match="--densify"):
        write_gguf(model, tiny_tokenizer, tmp_path / "x.gguf", "f32")
    ids = _ids(2, 16, tiny_tokenizer.vocab_size)
    before = _logits(model, ids)
    assert densify(model) == 14 and model.config.lowrank is None
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-4, atol=1e-4)
    path = write_gguf(model, tiny_tokenizer, tmp_path / "x.gguf", "f32")
    torch.testing.assert_close(_logits(load(str(path), dtype=torch.float32).model, ids), before,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("changes,message", [
    ({"keep": 1.2}, r"outside \(0, 1\)"), ({"keep": 0.0}, r"outside \(0, 1\)"), ({"keep": 1.0}, "break-even"),
    ({"method": "svdd"}, "unknown low-rank method 'svdd'. Did you mean: svd"),
    ({"ranks": "greedy"}, "unknown rank allocation"), ({"targets": ["embed_tokens"]}, "unknown low-rank target"),
    ({"keep": 0.01}, "with rank 0; raise --keep"),
])
def test_bad_settings_fail_before_any_work(changes, message):
    model = _tiny()
    with pytest.raises(SlmError, match=message):
        factorize_model(model, replace(LowRankConfig(method="svd"), **changes), progress=False)
    assert model.config.lowrank is None and not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_whitened_needs_calibration_ids():
    with pytest.raises(SlmError, match="needs calibration token ids"):
        factorize_model(_tiny(), LowRankConfig(method="whitened"), None, progress=False)


# -- the command line -----------------------------------------------------------------------------


def test_cli_lowrank_generate_and_export(tmp_path, tiny_tokenizer, capsys):
    from slmkit.interop.hf import save_hf

    save_hf(_tiny(vocab_size=tiny_tokenizer.vocab_size, tie_word_embeddings=True), tiny_tokenizer, tmp_path / "tiny")
    calib = tmp_path / "calib.txt"
    calib.write_text("Once upon a time there was a little robot who liked to count: 1, 2, 3, 42, 1000.\n" * 40)
    out = tmp_path / "lr"
    assert main(["lowrank", str(tmp_path / "tiny"), "--method", "whitened", "--keep", "0.6", "--calib", str(calib),
                 "--calib-samples", "4", "--calib-seq-len", "32", "--ranks", "sensitivity", "-o", str(out)]) == 0
    assert "14 linears factorized" in capsys.readouterr().out and (out / "model.safetensors").is_file()
    assert main(["generate", str(out), "Once upon", "--max-tokens", "3", "--dtype", "float32"]) == 0
    assert main(["export", "gguf", str(out), str(tmp_path / "x.gguf")]) == 2
    assert "--densify" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()
    assert main(["export", "gguf", str(out), str(tmp_path / "x.gguf"), "--type", "f32", "--densify"]) == 0
    assert (tmp_path / "x.gguf").is_file()


@pytest.mark.parametrize("args,message", [
    (["--keep", "1.2"], "outside (0, 1)"), (["--keep", "0"], "outside (0, 1)"),
    (["--method", "svdd"], "unknown low-rank method"), (["--calib", "missing.txt"], "not found"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_tokenizer, capsys, args, message):
    from slmkit.interop.hf import save_hf

    save_hf(_tiny(vocab_size=tiny_tokenizer.vocab_size), tiny_tokenizer, tmp_path / "tiny")
    assert main(["lowrank", str(tmp_path / "tiny"), *args, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
