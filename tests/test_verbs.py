"""The verb table: every verb's settings are its config's, the same way for each -- a documented
flag for every setting, key=value items (by YAML path or by flag name) that agree with the flags,
and `choices` refused whichever way a value comes in."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from slmkit.cli import BY_NAME, VERBS, _attr, _take_leftovers, build_parser, main, verb_path
from slmkit.cli_args import SPEC, Flag, config_from_args
from slmkit.config import MISSING, optional_of, walk
from slmkit.errors import SlmError
from slmkit.pipeline.recipe import read_recipe
from slmkit.pipeline.run import PipelineJob

NAMES = [verb.name for verb in VERBS]


def _parser(name: str) -> argparse.ArgumentParser:
    parser = build_parser(name)
    args, _ = parser.parse_known_args(name.split())
    return getattr(args, SPEC).parser


def _spec(name: str):
    return _parser(name).get_default(SPEC)


def _option(parser: argparse.ArgumentParser, flag: Flag) -> str:
    """The option string of `flag` in the verb's parser (the generated name, or its metadata flag)."""
    return next(a for a in parser._actions if a.dest == flag.dest).option_strings[-1]


@pytest.mark.parametrize("name", NAMES)
def test_every_setting_of_every_verb_has_a_documented_flag_in_its_help(name):
    parser, spec = _parser(name), _spec(name)
    assert spec.cls is _attr(BY_NAME[name].job)
    text = " ".join(parser.format_help().split())
    assert {leaf.key for flag in spec.flags for leaf in flag.leaves} == {leaf.key for leaf in walk(spec.cls)}
    for flag in spec.flags:
        shown = flag.leaf.meta.get("metavar", flag.name.upper()) if flag.positional else _option(parser, flag)
        assert shown in text, f"{name}: no {shown} for {flag.leaf.key} in --help"
        assert all(leaf.doc or "help" in leaf.meta for leaf in flag.leaves), f"{name}: {flag.leaf.key} has no docstring"


def _another_value(flag: Flag):
    """A value of the flag's setting other than its default (None when there is no obvious one)."""
    leaf = flag.leaf
    hint, default = optional_of(leaf.hint), leaf.default
    if "choices" in leaf.meta:
        others = [c for c in leaf.meta["choices"] if c != default]
        return others[-1] if others else None
    if hint is bool:
        return not default
    if hint is int:
        return 7 if default in (None, MISSING) else default + 1
    if hint is float:
        return 0.25 if default in (None, MISSING) else default / 2 + 0.125
    if hint is str:
        return "x-other"
    if typing.get_origin(hint) is list and typing.get_args(hint) in ((str,), ()):
        return ["a1", "b2"]
    return None


def _outcome(cls, parser, argv: list[str]):
    """The config argv gives, or the SlmError it raises."""
    try:
        args, extra = parser.parse_known_args(argv)
        args.overrides = [*(getattr(args, "overrides", None) or []), *extra]
        return config_from_args(cls, args)
    except SlmError as err:
        return f"error: {err}"


@pytest.mark.parametrize("name", NAMES)
def test_key_value_items_and_flags_agree(name):
    parser, spec = _parser(name), _spec(name)
    for flag in (f for f in spec.flags if not f.positional):
        value = _another_value(flag)
        if value is None:
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        option = _option(parser, flag)
        by_flag = [option] if isinstance(value, bool) else [option, text]
        if isinstance(value, list) and flag.leaf.meta.get("split", True) is False:  # one item per flag
            by_flag = [part for item in value for part in (option, item)]
        yaml_text = "[" + ", ".join(value) + "]" if isinstance(value, list) else str(value).lower() if isinstance(
            value, bool) else text
        by_path = [f"{leaf.key}={yaml_text}" for leaf in flag.leaves]
        by_name = [f"{flag.name}={yaml_text}"]
        results = [_outcome(spec.cls, parser, argv) for argv in (by_flag, by_path, by_name)]
        assert results[0] == results[1] == results[2], f"{name} {option}: {results}"


@pytest.mark.parametrize("name", NAMES)
def test_choices_are_refused_by_flag_and_by_key_value(name, capsys):
    parser, spec = _parser(name), _spec(name)
    for flag in (f for f in spec.flags if not f.positional and "choices" in f.leaf.meta):
        bad = "999" if all(isinstance(c, int) for c in flag.leaf.meta["choices"]) else "not-a-choice"
        with pytest.raises(SystemExit):
            parser.parse_args([_option(parser, flag), bad])
        assert "invalid choice" in capsys.readouterr().err
        outcome = _outcome(spec.cls, parser, [f"{flag.leaf.key}={bad}"])
        assert isinstance(outcome, str) and "is not one of" in outcome, f"{name}: {flag.leaf.key}"


def test_finetune_and_pretrain_take_their_nested_settings_as_flags():
    from slmkit.cli_args import config_from_args

    for name, argv, check in (("finetune", ["--lr", "1e-4", "--resume"], lambda c: c.train.lr == 1e-4 and c.resume),
                              ("pretrain", ["--steps", "12"], lambda c: c.train.steps == 12)):
        parser, spec = _parser(name), _spec(name)
        assert check(config_from_args(spec.cls, parser.parse_args(argv)))


def test_a_recipes_task_cleared_by_key_value_lets_the_users_own_file_train(tmp_path):
    """The README's way to fine-tune on one's own file with a shipped recipe."""
    recipe = Path(__file__).parents[1] / "configs" / "finetune" / "symptom2disease-lora.yaml"
    parser, spec = _parser("finetune"), _spec("finetune")
    mine = tmp_path / "my.jsonl"
    args = parser.parse_args(["--config", str(recipe), "data.task=", f"data.train={mine}", f"out={tmp_path / 'run'}"])
    cfg = config_from_args(spec.cls, args)
    assert not cfg.data.task and cfg.data.train == str(mine) and cfg.out == str(tmp_path / "run")
    assert cfg.method == "lora"  # the rest of the recipe stands


def test_an_empty_choice_set_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "smollm2-135m-instruct", "x", "--choices", ""])
    assert "holds no value" in capsys.readouterr().err


def test_a_yaml_syntax_error_is_one_line_naming_the_file_and_place(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant: {method: int4\n  group_size: [\n")
    assert main(["quantize", "smollm2-135m-instruct", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.yaml" in err and "line 2" in err and "Traceback" not in err


def test_the_top_level_help_imports_no_torch():
    """`slm --help` and building the verb table load no job module (they import torch)."""
    code = "import sys; from slmkit.cli import build_parser; build_parser(None); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def _readme_commands() -> list[str]:
    """Every `slm ...` command line of the README's code blocks (continuation lines joined)."""
    commands, pending = [], ""
    for line in (Path(__file__).parents[1] / "README.md").read_text().splitlines():
        text = line.strip()
        if pending or text.startswith((".venv/bin/slm ", "slm ")):
            pending += " " + text.removesuffix("\\").strip()
            if not text.endswith("\\"):
                commands.append(pending.strip())
                pending = ""
    return commands


@pytest.mark.parametrize("command", _readme_commands())
def test_every_readme_command_parses_as_written(command):
    """The README's commands, as a user would paste them: the verb exists, every flag and key=value
    item names a setting, values have the right types and choices, and the config builds (a --config
    file is read). Nothing runs: building the config is where bad input stops before work."""
    argv = shlex.split(command, comments=True)[1:]
    parser = build_parser(verb_path(argv))
    args, extra = parser.parse_known_args(argv)
    _take_leftovers(parser, args, extra)
    job = config_from_args(_attr(BY_NAME[args.verb_name].job), args)
    if isinstance(job, PipelineJob):  # the recipe too: its sections and the overrides name real settings
        assert read_recipe(job.recipe, job.overrides).cfg.name


def test_the_readme_has_commands_to_check():
    commands = _readme_commands()
    assert len(commands) > 40 and {c.split()[1] for c in commands} >= {"generate", "finetune", "pipeline", "serve"}
