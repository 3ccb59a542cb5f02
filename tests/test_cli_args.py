"""Flags generated from config dataclasses: flattening, shared names, bools, None types, lists,
precedence (defaults < YAML < key=value < flags) and errors that name the closest setting.

Fast: no model is loaded; the last tests build each verb's real parser (importing its job module)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import pytest

from slmkit.cli_args import add_config_arguments, config_from_args
from slmkit.config import walk
from slmkit.errors import SlmError


@dataclass
class Sparse:
    method: str = field(default="wanda", metadata={"choices": ("magnitude", "wanda")})
    """how weights are chosen"""
    calib_samples: int = 64
    """calibration windows"""
    ratio: float | None = None
    """share removed"""


@dataclass
class Shape:
    calib_samples: int = 32
    """calibration windows"""
    refit: bool = True
    """refit the kept weights by least squares"""
    skip: list[str] = field(default_factory=list)
    """linears to leave alone"""


@dataclass
class Job:
    model: str = ""
    """the MODEL to read"""
    out: str = field(default="", metadata={"flag": ("-o", "--out")})
    """output directory"""
    structured: bool = False
    """remove whole rows"""
    limit: int | None = None
    """documents at most"""
    stop: list[str] = field(default_factory=list, metadata={"split": False})
    """stop strings"""
    sparse: Sparse = field(default_factory=Sparse)
    """unstructured settings"""
    shape: Shape = field(default_factory=Shape)
    """structured settings"""


def _parser(cls=Job, positional=("model",), **kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slm job")
    add_config_arguments(parser, cls, positional=positional, **kwargs)
    return parser


def _job(argv: list[str], cls=Job, **kwargs):
    args, extra = _parser(cls, **kwargs).parse_known_args(argv)
    return config_from_args(cls, args, extra)


def test_nested_sections_are_flattened_to_top_level_flags():
    job = _job(["m", "--method", "magnitude", "--ratio", "0.5", "-o", "x"])
    assert (job.model, job.out, job.sparse.method, job.sparse.ratio) == ("m", "x", "magnitude", 0.5)
    assert job == Job(model="m", out="x", sparse=Sparse(method="magnitude", ratio=0.5))


def test_a_name_in_two_sections_is_one_flag_that_sets_both_and_each_keeps_its_own_default():
    assert (_job([]).sparse.calib_samples, _job([]).shape.calib_samples) == (64, 32)
    job = _job(["--calib-samples", "8"])
    assert (job.sparse.calib_samples, job.shape.calib_samples) == (8, 8)
    help_text = " ".join(_parser().format_help().split())
    assert "sparse.calib_samples 64, shape.calib_samples 32" in help_text
    assert "sets sparse.calib_samples and shape.calib_samples" in help_text


def test_bools_default_false_are_switches_and_default_true_are_negations():
    assert _job([]).structured is False and _job(["--structured"]).structured is True
    assert _job([]).shape.refit is True and _job(["--no-refit"]).shape.refit is False
    with pytest.raises(SystemExit):
        _parser().parse_args(["--refit"])


def test_optional_types_take_the_inner_type_and_refuse_other_values(capsys):
    job = _job(["--limit", "5"])
    assert job.limit == 5 and isinstance(job.limit, int)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--limit", "many"])
    assert "invalid int value: 'many'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["--method", "wandaa"])  # choices from the field's metadata


def test_lists_take_commas_and_repeats_unless_their_items_may_hold_commas():
    job = _job(["--skip", "a,b", "--skip", "c", "--stop", "x, y", "--stop", "z"])
    assert job.shape.skip == ["a", "b", "c"] and job.stop == ["x, y", "z"]
    help_text = " ".join(_parser().format_help().split())
    assert "comma-separated or repeated" in help_text and "repeat the flag for each" in help_text


def test_precedence_defaults_then_yaml_then_key_value_then_flags(tmp_path):
    recipe = tmp_path / "job.yaml"
    recipe.write_text("out: from-yaml\nlimit: 3\nsparse: {method: magnitude, calib_samples: 16}\n")
    job = _job(["--config", str(recipe), "limit=4", "sparse.calib_samples=20"])
    assert (job.out, job.limit, job.sparse.method, job.sparse.calib_samples) == ("from-yaml", 4, "magnitude", 20)
    assert job.shape.calib_samples == 32  # YAML set one section only
    job = _job(["--config", str(recipe), "limit=4", "--limit", "5", "m"])
    assert (job.limit, job.model) == (5, "m")
    assert _job(["model=a", "b"]).model == "b"  # a positional argument is a flag too


def test_key_value_items_and_positionals_mix_in_any_order():
    parser = _parser()
    args, extra = parser.parse_known_args(["-o", "x", "sparse.ratio=0.25", "--structured", "m", "limit=2"])
    job = config_from_args(Job, args, extra)  # argparse leaves positionals after an option over
    assert (job.model, job.out, job.sparse.ratio, job.limit, job.structured) == ("m", "x", 0.25, 2, True)


def test_an_unknown_key_names_the_closest_setting_in_any_section(tmp_path):
    with pytest.raises(SlmError, match=r"unknown setting 'calib_sample'\. Did you mean: sparse\.calib_samples, "
                                       r"shape\.calib_samples\?"):
        _job(["m", "calib_sample=3"])
    with pytest.raises(SlmError, match=r"'sparse\.metod'.*Did you mean: sparse\.method"):
        _job(["m", "sparse.metod=wanda"])
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("shape: {refitt: false}\n")
    with pytest.raises(SlmError, match=r"'shape\.refitt'.*Did you mean: shape\.refit.*slm job --help"):
        _job(["--config", str(recipe)])
    with pytest.raises(SlmError, match="unexpected argument 'extra'"):
        _job(["m", "extra"])
    with pytest.raises(SlmError, match="limit"):  # types are checked as for YAML
        _job(["limit=many"])


def test_help_lists_every_setting_with_its_docstring_and_default():
    help_text = " ".join(_parser().format_help().split())
    for leaf in walk(Job):
        assert leaf.doc in help_text, leaf.key
    assert "--method {magnitude,wanda}" in help_text and "(default: wanda; key sparse.method)" in help_text
    assert "-o OUT, --out OUT" in help_text and "--no-refit" in help_text and "on by default" in help_text
    assert "unstructured settings" in help_text and "--config FILE.yaml" in help_text


def test_a_verb_may_give_its_own_defaults():
    mine = Job(limit=7, shape=Shape(calib_samples=4))
    assert _job([], defaults=mine).limit == 7 and _job([], defaults=mine).shape.calib_samples == 4
    assert "default: 7" in _parser(defaults=mine).format_help()


@dataclass
class IntN:
    n: int = 1


@dataclass
class StrN:
    n: str = "x"


@dataclass
class Clash:
    a: IntN = field(default_factory=IntN)
    b: StrN = field(default_factory=StrN)


def test_leaves_of_one_name_that_differ_get_a_flag_each_named_by_its_path():
    parser = _parser(Clash, positional=())
    job = config_from_args(Clash, parser.parse_args(["--a-n", "3", "--b-n", "y"]))
    assert (job.a.n, job.b.n) == (3, "y")
    job = config_from_args(Clash, parser.parse_args(["a_n=4", "b.n=z"]))  # the flag's name or the YAML path
    assert (job.a.n, job.b.n) == (4, "z")


# -- the real verbs ----------------------------------------------------------------------------


def _verb_parser(verb: str) -> argparse.ArgumentParser:
    from slmkit.cli import build_parser
    from slmkit.cli_args import SPEC

    parser = build_parser(verb)
    args, _ = parser.parse_known_args(verb.split())
    return getattr(args, SPEC).parser


def test_existing_flag_names_are_kept():
    quantize = _verb_parser("quantize").format_help()
    assert all(f in quantize for f in ("--keep-lm-head", "--group-size", "-o OUT, --out OUT", "--calib-seq-len"))
    bench = _verb_parser("bench").format_help()
    assert "--batch BATCHES" in bench and "-o OUTPUT, --output OUTPUT" in bench
    serve = _verb_parser("serve").format_help()
    assert all(f in serve for f in ("--route SIDE=TARGET", "--remote-timeout", "--max-batch", "--api-key"))


def test_the_cli_reads_a_job_from_flags_yaml_and_items_in_any_order(tmp_path):
    from slmkit.cli import _take_leftovers, build_parser
    from slmkit.jobs.compress import QuantizeJob

    recipe = tmp_path / "q.yaml"
    recipe.write_text("quant: {method: gptq, group_size: 64}\n")
    argv = ["quantize", "--config", str(recipe), "-o", "out", "m", "quant.calib_samples=8", "--group-size", "32"]
    parser = build_parser("quantize")
    args, extra = parser.parse_known_args(argv)
    _take_leftovers(parser, args, extra)
    job = config_from_args(QuantizeJob, args)
    assert isinstance(job, QuantizeJob) and (job.model, job.out) == ("m", "out")
    assert (job.quant.method, job.quant.group_size, job.quant.calib_samples) == ("gptq", 32, 8)
    assert dataclasses.asdict(job)["quant"]["lm_head"] is True


def test_an_unknown_flag_names_the_closest(capsys):
    from slmkit.cli import main

    with pytest.raises(SystemExit):
        main(["quantize", "m", "-o", "x", "--grup-size", "64"])
    assert "did you mean --group-size?" in capsys.readouterr().err
