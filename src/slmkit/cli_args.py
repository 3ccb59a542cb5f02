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
  An item is a key=value setting when its KEY names a setting, wherever it stands on the line;
  other items fill the positional arguments in order.

It knows nothing of slmkit's verbs; the CLI decides which class a verb uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

import yaml

from slmkit.config import apply_overrides, field_docs, from_dict, read_yaml
from slmkit.errors import SlmError

T = TypeVar("T")
DEST = "cfg:"  # prefix of the generated destinations: no clash with the parser's own (verb, debug, ...)
SPEC = DEST + "spec"  # where the parser leaves what config_from_args needs
MISSING = dataclasses.MISSING
KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True)
class Leaf:
    """One setting: its path through the sections, type, default and docstring."""

    path: tuple[str, ...]
    hint: Any
    default: Any
    doc: str
    meta: Mapping[str, Any]

    @property
    def key(self) -> str:
        return ".".join(self.path)


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


def config_leaves(cls: type, defaults: Any = None, prefix: tuple[str, ...] = ()) -> list[Leaf]:
    """Every setting of `cls`, nested sections flattened, in field order.

    defaults: an instance whose values are shown and used as the defaults (a verb may differ from
    the class, e.g. chat answers at most 512 tokens where generate writes 128)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    leaves = []
    for f in dataclasses.fields(cls):
        default = _default(f, defaults)
        if dataclasses.is_dataclass(hints[f.name]):
            leaves += config_leaves(hints[f.name], None if default is MISSING else default, prefix + (f.name,))
        else:
            leaves.append(Leaf(prefix + (f.name,), hints[f.name], default, docs.get(f.name, ""), f.metadata))
    return leaves


def _default(f: dataclasses.Field, defaults: Any) -> Any:
    if defaults is not None:
        return getattr(defaults, f.name)
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def setting_paths(cls: type, prefix: str = "") -> list[str]:
    """Every key a YAML file or a key=value item may set: the sections and their settings, dotted."""
    hints = typing.get_type_hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        paths.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            paths += setting_paths(hints[f.name], f"{prefix}{f.name}.")
    return paths


def _section_doc(cls: type, section: tuple[str, ...]) -> str:
    for name in section[:-1]:
        cls = typing.get_type_hints(cls)[name]
    return field_docs(cls).get(section[-1], "")


def _optional_of(hint: Any) -> Any:
    """T for `T | None`; the hint itself otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return hint


def _item_type(hint: Any) -> Any:
    """The item type of a list or tuple hint, else None."""
    hint = _optional_of(hint)
    if typing.get_origin(hint) in (list, tuple) or hint in (list, tuple):
        return (typing.get_args(hint) or (str,))[0]
    return None


def _is_bool(hint: Any) -> bool:
    return _optional_of(hint) is bool


# --------------------------------------------------------------------------------------------
# Building the parser
# --------------------------------------------------------------------------------------------


def config_flags(cls: type, positional: tuple[str, ...] = (), defaults: Any = None) -> list[Flag]:
    """The flags of `cls`: one per setting name (shared names merged), positional ones marked."""
    groups: dict[str, list[Leaf]] = {}
    for leaf in config_leaves(cls, defaults):
        groups.setdefault(leaf.path[-1], []).append(leaf)
    flags = [Flag(name, leaves, name in positional) for name, leaves in groups.items()]
    for flag in flags:
        _check_shared(flag)
    unknown = set(positional) - {f.name for f in flags if f.positional}
    if unknown:
        raise ValueError(f"{cls.__name__} has no setting {sorted(unknown)} to take as a positional argument")
    return flags


def _check_shared(flag: Flag) -> None:
    """Leaves behind one flag must read the same values; a programming error otherwise."""
    first = flag.leaf
    for other in flag.leaves[1:]:
        same_type = _optional_of(other.hint) == _optional_of(first.hint)
        same_bool = not _is_bool(first.hint) or (other.default is True) == (first.default is True)
        if not same_type or not same_bool or other.meta != first.meta:
            raise TypeError(f"{first.key} and {other.key} would share the flag of '{flag.name}' but differ in "
                            "type, default or metadata; give one of them its own metadata flag")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = (),
                         defaults: Any = None) -> list[Flag]:
    """Add a flag per setting of `cls` (positional arguments for the names in `positional`), plus
    `--config FILE.yaml` and trailing `key=value` items; returns the flags."""
    flags = config_flags(cls, positional, defaults)
    for name in positional:
        flag = next(f for f in flags if f.name == name)
        parser.add_argument(flag.dest, nargs="*" if _item_type(flag.leaf.hint) else "?", default=None,
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
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=_escape(f"settings by their YAML path, e.g. {_example(flags)}; they override "
                                     "--config, and flags override them"))
    parser.set_defaults(**{SPEC: Spec(cls, flags, defaults, parser)})
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
        kwargs["type"] = meta.get("type") or _value_type(_optional_of(leaf.hint))
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
    data = _plain(dataclasses.asdict(spec.defaults)) if spec.defaults is not None else {}
    if getattr(args, "config", None):
        data = _merge(data, read_yaml(args.config))
    overrides, values = split_items(spec, _items(spec, args) + list(extra))
    data = apply_overrides(data, overrides)
    for flag in spec.flags:
        value = values.get(flag.name, MISSING) if flag.positional else getattr(args, flag.dest, MISSING)
        if value is not MISSING:
            for leaf in flag.leaves:
                _put(data, leaf.path, value)
    check_keys(cls, data, spec.prog)
    return from_dict(cls, data)


def _items(spec: Spec, args: argparse.Namespace) -> list[str]:
    """Positional items in command-line order (argparse fills the positionals left to right)."""
    items: list[str] = []
    for flag in spec.flags:
        value = getattr(args, flag.dest, None) if flag.positional else None
        items += value if isinstance(value, list) else [] if value is None else [value]
    return items + list(getattr(args, "overrides", None) or [])


def split_items(spec: Spec, items: list[str]) -> tuple[list[str], dict[str, Any]]:
    """(key=value overrides, {positional name: value}): an item is an override when its key names
    a setting; the others fill the positional arguments in order, a list one taking the rest."""
    known = set(setting_paths(spec.cls))
    overrides, rest = [], []
    for item in items:
        key, sep, _ = item.partition("=")
        (overrides if sep and key in known else rest).append(item)
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


def check_keys(cls: type, data: dict[str, Any], prog: str = "slm") -> None:
    """Refuse a key that names no setting, suggesting the closest ones (any section)."""
    for key in _unknown_keys(cls, data):
        raise unknown_setting(key, cls, prog)


def _unknown_keys(cls: type, data: dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            yield prefix + str(key)
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            yield from _unknown_keys(hints[key], value, f"{prefix}{key}.")


def unknown_setting(key: str, cls: type, prog: str = "slm") -> SlmError:
    """An error naming the closest settings: by spelling, and by name in any section (a flat
    `group_size=64` finds `quant.group_size`)."""
    paths = setting_paths(cls)
    names = {_leaf_name(p) for p in paths}
    near_names = difflib.get_close_matches(_leaf_name(key), names, n=3, cutoff=0.7)
    by_name = [p for name in near_names for p in paths if _leaf_name(p) == name]
    suggestions = list(dict.fromkeys(by_name + difflib.get_close_matches(key, paths, n=3, cutoff=0.8)))[:4]
    hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
    return SlmError(f"unknown setting '{key}'.{hint} (`{prog} --help` lists them all)")


def _leaf_name(path: str) -> str:
    return path.rsplit(".", 1)[-1]


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
