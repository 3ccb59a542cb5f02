"""Command-line flags generated from a config dataclass, and the config read back from them.

A verb's config dataclass is its whole interface: `add_config_arguments` turns every field into a
flag and `config_from_args` builds the config again, so `slm quantize` and a `slm pipeline` stage
read one definition and cannot drift apart. The rules:

- a field `group_size` is the flag `--group-size`; its docstring is the help, its default is shown;
- nested sections are flattened (`quant.group_size` is `--group-size`); YAML keeps the nesting;
- fields of one name in several sections (PruneJob's `sparse.calib` and `shape.calib`) share one
  flag that sets them all; left out, each keeps its own default;
- a bool that defaults to True is `--no-NAME` (it turns the setting off), any other bool `--NAME`;
- `T | None` takes a T; a union of several types or a dict is read as YAML, like a key=value item;
- a list takes comma-separated values and the flag may be repeated (`--skip a,b --skip c`); a field
  whose items may hold commas sets `metadata={"split": False}`: one item per flag, repeated;
- `metadata` may also give `flag` (the option strings, to keep an established name; for a bool,
  the flag that flips its default), `choices`, `metavar`, `help` and `type` (an argparse type);
- every verb also takes `--config FILE.yaml` and `KEY=VALUE` items (nested with dots), and the
  later source wins: defaults < the YAML file < key=value items < flags and positional arguments.
  An item is a key=value setting when its KEY names a setting (by its YAML path, or by its flag's
  name: `dtype=float32` is `--dtype float32`), wherever it stands on the line; other items fill
  the positional arguments in order.

It knows nothing of slmkit's verbs; the CLI decides which class a verb uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml

from slmkit.config import (
    MISSING,
    Leaf,
    apply_overrides,
    field_docs,
    from_dict,
    optional_of,
    read_yaml,
    setting_paths,
    unknown_setting,
    walk,
)
from slmkit.errors import SlmError

T = TypeVar("T")
DEST = "cfg:"  # prefix of the generated destinations: no clash with the parser's own (verb, debug, ...)
SPEC = DEST + "spec"  # where the parser leaves what config_from_args needs
KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass
class Flag:
    """One command-line argument; it sets every leaf in `leaves` (more than one: a shared name)."""

    name: str
    leaves: list[Leaf]
    positional: bool = False

    @property
    def leaf(self) -> Leaf:
        return self.leaves[0]

    @property
    def dest(self) -> str:
        return DEST + self.name


@dataclass
class Spec:
    """What config_from_args needs of the parser that add_config_arguments built."""

    cls: type
    flags: list[Flag]
    defaults: Any
    parser: argparse.ArgumentParser

    @property
    def prog(self) -> str:
        return self.parser.prog


# --------------------------------------------------------------------------------------------
# Reading a dataclass
# --------------------------------------------------------------------------------------------


def _section_doc(cls: type, section: tuple[str, ...]) -> str:
    for name in section[:-1]:
        cls = typing.get_type_hints(cls)[name]
    return field_docs(cls).get(section[-1], "")


def _item_type(hint: Any) -> Any:
    """The item type of a list or tuple hint, else None."""
    hint = optional_of(hint)
    if typing.get_origin(hint) in (list, tuple) or hint in (list, tuple):
        return (typing.get_args(hint) or (str,))[0]
    return None


def _is_bool(hint: Any) -> bool:
    return optional_of(hint) is bool


# --------------------------------------------------------------------------------------------
# Building the parser
# --------------------------------------------------------------------------------------------


def config_flags(cls: type, positional: tuple[str, ...] = (), defaults: Any = None) -> list[Flag]:
    """The flags of `cls`: one per setting name, shared by the sections that use the name alike
    (PruneJob's `--calib` sets sparse.calib and shape.calib); where one name means different things
    (fine-tuning's `method` and `quant.method`), each gets its own flag named by its path
    (`--method`, `--quant-method`). Positional ones are marked."""
    groups: dict[str, list[Leaf]] = {}
    for leaf in walk(cls, defaults):
        groups.setdefault(leaf.path[-1], []).append(leaf)
    flags = []
    for name, leaves in groups.items():
        if _shareable(leaves):
            flags.append(Flag(name, leaves, name in positional))
        else:
            flags += [Flag("_".join(leaf.path), [leaf], leaf.path == (name,) and name in positional) for leaf in leaves]
    unknown = set(positional) - {f.name for f in flags if f.positional}
    if unknown:
        raise ValueError(f"{cls.__name__} has no setting {sorted(unknown)} to take as a positional argument")
    return flags


def _shareable(leaves: list[Leaf]) -> bool:
    """Whether one flag can set all these leaves: the same type, bool default and metadata."""
    first = leaves[0]
    for other in leaves[1:]:
        same_type = optional_of(other.hint) == optional_of(first.hint)
        same_bool = not _is_bool(first.hint) or (other.default is True) == (first.default is True)
        if not same_type or not same_bool or other.meta != first.meta:
            return False
    return True


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = (),
                         defaults: Any = None) -> list[Flag]:
    """Add a flag per setting of `cls` (positional arguments for the names in `positional`), plus
    `--config FILE.yaml` and trailing `key=value` items; returns the flags."""
    flags = config_flags(cls, positional, defaults)
    parser.set_defaults(**{SPEC: Spec(cls, flags, defaults, parser)})
    if not flags:  # a verb without settings
        return flags
    takes_rest = False  # a list as the last positional argument takes the key=value items too
    for name in positional:
        flag = next(f for f in flags if f.name == name)
        takes_rest = _item_type(flag.leaf.hint) is not None
        parser.add_argument(flag.dest, nargs="*" if takes_rest else "?", default=None,
                            metavar=flag.leaf.meta.get("metavar", name.upper()), help=_help(flag))
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of these settings, nested as the "
                        "key=value names below; key=value items and flags override it")
    groups: dict[tuple[str, ...], Any] = {}
    for flag in flags:
        if flag.positional:
            continue
        section = flag.leaf.path[:-1]
        if section and section not in groups:
            doc = _section_doc(cls, section)
            key = ".".join(section)
            groups[section] = parser.add_argument_group(
                key, _escape(f"{doc + chr(10) if doc else ''}(YAML section `{key}:`; key=value {key}.NAME=VALUE)"))
        (groups[section] if section else parser).add_argument(*_option_strings(flag), **_flag_kwargs(flag))
    items = (f"settings by their YAML path, e.g. {_example(flags)}: they override --config, and flags override "
             "them" + ("; they may stand among the positional items above" if takes_rest else ""))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=_escape(items))
    return flags


def _example(flags: list[Flag]) -> str:
    """A key=value item for the help: a nested setting with a default if there is one."""
    leaves = sorted((leaf for f in flags if not f.positional for leaf in f.leaves), key=lambda x: -len(x.path))
    shown = [x for x in leaves if x.default not in (MISSING, None, "", [], ()) and not isinstance(x.default, bool)]
    leaf = (shown or leaves or [flags[0].leaf])[0]
    return f"{leaf.key}={_show(leaf.default) if shown else 'VALUE'}"


def _option_strings(flag: Flag) -> tuple[str, ...]:
    given = flag.leaf.meta.get("flag")
    if given:
        return (given,) if isinstance(given, str) else tuple(given)
    dashed = flag.name.replace("_", "-")
    return (f"--no-{dashed}",) if _is_bool(flag.leaf.hint) and flag.leaf.default is True else (f"--{dashed}",)


def _flag_kwargs(flag: Flag) -> dict[str, Any]:
    leaf, meta = flag.leaf, flag.leaf.meta
    kwargs: dict[str, Any] = {"dest": flag.dest, "default": argparse.SUPPRESS, "help": _help(flag)}
    if _is_bool(leaf.hint):
        kwargs["action"] = "store_false" if leaf.default is True else "store_true"
        return kwargs
    item = _item_type(leaf.hint)
    if item is not None:
        split = meta.get("split", True)
        kwargs["action"] = "extend" if split else "append"
        kwargs["type"] = _split_type(item, meta.get("choices")) if split else _value_type(item)
    else:
        kwargs["type"] = meta.get("type") or _value_type(optional_of(leaf.hint))
        if "choices" in meta:
            kwargs["choices"] = tuple(meta["choices"])
    if "choices" not in kwargs:
        kwargs["metavar"] = meta.get("metavar", flag.name.upper())
    return kwargs


def _value_type(hint: Any):
    """The argparse type of one value: int, float or str as they are; anything else (a union of
    several types, a dict) is read as YAML, like a key=value item, and checked by from_dict."""
    return hint if hint in (int, float, str) else _yaml_value


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a value YAML reads") from None


def _split_type(item: Any, choices=None):
    """argparse type of a list flag: comma-separated values, each of the item type."""
    convert = _value_type(item)

    def parse(text: str) -> list:
        values = [convert(part.strip()) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"'{text}' holds no value; give at least one (comma-separated)")
        for value in values:
            if choices and value not in choices:
                raise argparse.ArgumentTypeError(f"'{value}' is not one of {', '.join(map(str, choices))}")
        return values

    parse.__name__ = f"comma-separated {getattr(item, '__name__', 'value')}"  # argparse names it in errors
    return parse


def _help(flag: Flag) -> str:
    leaf = flag.leaf
    notes = []
    if _item_type(leaf.hint) is not None and not flag.positional:
        notes.append("comma-separated or repeated" if leaf.meta.get("split", True) else "repeat the flag for each")
    default = _default_text(flag)
    if default:
        notes.append(default)
    if len(flag.leaves) > 1:
        notes.append("sets " + " and ".join(x.key for x in flag.leaves))
    elif len(leaf.path) > 1 and leaf.key not in default:
        notes.append(f"key {leaf.key}")
    text = leaf.meta.get("help") or leaf.doc or leaf.key
    return _escape(f"{text} ({'; '.join(notes)})" if notes else text)


def _default_text(flag: Flag) -> str:
    values = [leaf.default for leaf in flag.leaves]
    if _is_bool(flag.leaf.hint):
        if values[0] is not True:
            return ""
        return f"sets {flag.leaf.key} false" if "help" in flag.leaf.meta else "on by default; the flag turns it off"
    if any(v != values[0] for v in values):
        return "default: " + ", ".join(f"{x.key} {_show(x.default)}" for x in flag.leaves)
    value = values[0]
    if value is MISSING:
        return "required"
    if value is None or value == "" or (isinstance(value, (list, tuple)) and not value):
        return ""  # the docstring says what happens without it
    return f"default: {_show(value)}"


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse %-formats help strings


# --------------------------------------------------------------------------------------------
# Reading the config back
# --------------------------------------------------------------------------------------------


def config_from_args(cls: type[T], args: argparse.Namespace, extra: list[str] = ()) -> T:
    """The config `args` give: defaults < --config YAML < key=value items < flags and positionals.

    extra: command-line items argparse left over (positional items after an option), read like
    the trailing key=value items."""
    spec: Spec | None = getattr(args, SPEC, None)
    if spec is None or spec.cls is not cls:
        raise TypeError(f"these arguments were not made by add_config_arguments(parser, {cls.__name__})")
    data = _plain(dataclasses.asdict(_defaults(spec)))  # a section keeps its verb's defaults (chat's 512 tokens)
    if getattr(args, "config", None):
        data = _merge(data, read_yaml(args.config))
    overrides, values = split_items(spec, _items(spec, args) + list(extra))
    data = apply_overrides(data, overrides)
    for flag in spec.flags:
        value = values.get(flag.name, MISSING) if flag.positional else getattr(args, flag.dest, MISSING)
        if value is not MISSING:
            for leaf in flag.leaves:
                _put(data, leaf.path, value)
    return from_dict(cls, data, prog=spec.prog)


def _defaults(spec: Spec) -> Any:
    """The instance whose values are the defaults: the one given, else the class's own."""
    return spec.defaults if spec.defaults is not None else spec.cls()


def _items(spec: Spec, args: argparse.Namespace) -> list[str]:
    """Positional items in command-line order (argparse fills the positionals left to right)."""
    items: list[str] = []
    for flag in spec.flags:
        value = getattr(args, flag.dest, None) if flag.positional else None
        items += value if isinstance(value, list) else [] if value is None else [value]
    return items + list(getattr(args, "overrides", None) or [])


def _names(flag: Flag) -> set[str]:
    """A flag's names for key=value items: its own, and its long option's (`--max-tokens`: max_tokens)."""
    options = [o for o in _option_strings(flag) if o.startswith("--") and not o.startswith("--no-")]
    return {flag.name, *(o[2:].replace("-", "_") for o in options)}


def split_items(spec: Spec, items: list[str]) -> tuple[list[str], dict[str, Any]]:
    """(key=value overrides, {positional name: value}): an item is an override when its key names
    a setting by its YAML path (`runtime.dtype=float32`) or by its flag's name (`dtype=float32`, as
    `--dtype float32`); the others fill the positional arguments in order, a list one taking the rest."""
    leaves = {leaf.key for leaf in walk(spec.cls)}
    sections = set(setting_paths(spec.cls)) - leaves
    by_flag = {name: f.leaves for f in spec.flags if not f.positional for name in _names(f)}
    overrides, rest = [], []
    for item in items:
        key, sep, value = item.partition("=")
        flag = key.replace("-", "_")
        if sep and key in leaves:
            overrides.append(item)
        elif sep and flag in by_flag:  # fine-tuning's train=FILE is data.train, not the train section
            overrides += [f"{leaf.key}={value}" for leaf in by_flag[flag]]
        elif sep and key in sections:
            overrides.append(item)
        else:
            rest.append(item)
    values: dict[str, Any] = {}
    for flag in (f for f in spec.flags if f.positional):
        if not rest:
            break
        if _item_type(flag.leaf.hint) is not None:
            values[flag.name], rest = rest, []
        else:
            values[flag.name], rest = rest[0], rest[1:]
    if rest:
        key, sep, _ = rest[0].partition("=")
        if sep and KEY.match(key):
            raise unknown_setting(key, spec.cls, spec.prog)
        raise SlmError(f"unexpected argument '{rest[0]}' (see `{spec.prog} --help`)")
    return overrides, values


def _put(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        if not isinstance(data.get(part), dict):
            data[part] = {}
        data = data[part]
    data[path[-1]] = value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, section by section."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def _plain(value: Any) -> Any:
    """Tuples as lists, all the way down (YAML and apply_overrides know lists only)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
