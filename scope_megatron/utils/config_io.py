"""Typed configuration from dataclasses: defaults < YAML file < command line.

A configuration is a dataclass whose fields are either leaves (int, float, str, bool, Optional
of those, tuples of those) or nested dataclasses (sections). Each leaf declares its help text,
and optionally its command-line flag, with `option(...)`; without one it gets
`--<section>-<name>` (dashes). Megatron-LM's flag names are used where Megatron has one
(`--lr`, `--tensor-model-parallel-size`, ...), so users can reuse their habits.

  cfg = parse_config(TrainConfig, argv)        # --config file.yaml plus flag overrides
  save_config(cfg, path); markdown_table(TrainConfig)

Unknown YAML keys and ill-typed values are errors that name the key and list what is valid;
values are validated by the dataclasses' own __post_init__.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import yaml


def option(default: Any = dataclasses.MISSING, *, help: str, flag: Optional[str] = None,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A documented leaf field (help text is required: every default is documented)."""
    metadata = {"help": help, "flag": flag}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type, default_factory: Any = None) -> Any:
    """A nested dataclass field (a config section). Its defaults are cls()'s, or those of the
    instance default_factory() returns (for a section class with required fields, e.g. a model
    architecture whose sizes the parent config chooses)."""
    return dataclasses.field(default_factory=default_factory or cls)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the fix."""


# ---------------------------------------------------------------------------------------------
# introspection
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Leaf:
    path: Tuple[str, ...]  # e.g. ("train", "lr")
    field: dataclasses.Field
    type: Any

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def flag(self) -> str:
        return self.field.metadata.get("flag") or "--" + "-".join(self.path).replace("_", "-")

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")

    def default(self, owner_default: Any) -> Any:
        return getattr(owner_default, self.path[-1])


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def leaves(cls: type, prefix: Tuple[str, ...] = ()) -> Iterator[Leaf]:
    """Every leaf field of a config class, sections depth-first."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            yield from leaves(tp, prefix + (f.name,))
        else:
            if "help" not in f.metadata:
                raise TypeError(f"{cls.__name__}.{f.name}: config leaves must be declared with "
                                "option(default, help=...)")
            yield Leaf(prefix + (f.name,), f, tp)


def _unwrap_optional(tp: Any) -> Tuple[Any, bool]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def convert(value: Any, tp: Any, key: str) -> Any:
    """A YAML / command-line value converted to the leaf's declared type (strict)."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"config {key}: null is not allowed (expected {getattr(tp, '__name__', tp)})")
    origin = typing.get_origin(inner)
    if origin in (tuple, list):
        (item_tp, *_) = typing.get_args(inner) or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip() != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config {key}: expected a list, got {value!r}")
        return tuple(convert(v, item_tp, key) for v in value)
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config {key}: expected true/false, got {value!r}")
    if inner is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"config {key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config {key}: expected an integer, got {value!r}") from None
    if inner is float:
        if isinstance(value, bool):
            raise ConfigError(f"config {key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config {key}: expected a number, got {value!r}") from None
    if inner is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"config {key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"config {key}: unsupported field type {tp!r}")


# ---------------------------------------------------------------------------------------------
# building a config
# ---------------------------------------------------------------------------------------------
def _flatten_yaml(data: Dict[str, Any], cls: type, prefix: Tuple[str, ...] = ()) -> Dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"config {'.'.join(prefix) or '(top level)'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out: Dict[str, Any] = {}
    for k, v in data.items():
        if k not in names:
            raise ConfigError(f"config: unknown key {'.'.join(prefix + (str(k),))!r}; valid keys here: "
                              f"{sorted(names)}")
        if _is_section(hints[k]):
            out.update(_flatten_yaml(v if v is not None else {}, hints[k], prefix + (k,)))
        else:
            out[".".join(prefix + (k,))] = v
    return out


def build(cls: type, values: Dict[str, Any]) -> Any:
    """Instantiates `cls` from flat {"section.name": value} overrides on top of cls()'s defaults."""
    return _build(cls(), values, ())


def _build(default: Any, values: Dict[str, Any], prefix: Tuple[str, ...]) -> Any:
    cls = type(default)
    hints = typing.get_type_hints(cls)
    changes = {}
    for f in dataclasses.fields(cls):
        path = prefix + (f.name,)
        if _is_section(hints[f.name]):
            changes[f.name] = _build(getattr(default, f.name), values, path)
        elif ".".join(path) in values:
            changes[f.name] = convert(values[".".join(path)], hints[f.name], ".".join(path))
    try:
        return dataclasses.replace(default, **changes)  # re-runs the section's validation
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"config {'.'.join(prefix) or cls.__name__}: {exc}") from exc


def _owner(defaults: Any, leaf: Leaf) -> Any:
    owner = defaults
    for p in leaf.path[:-1]:
        owner = getattr(owner, p)
    return owner


def argument_parser(cls: type, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file with any subset of the fields "
                        "(sections as nested mappings); flags override it")
    defaults = cls()
    for leaf in leaves(cls):
        owner = _owner(defaults, leaf)
        parser.add_argument(leaf.flag, dest=leaf.key, default=argparse.SUPPRESS, metavar="VALUE",
                            help=f"{leaf.help} [{leaf.key}; default: {leaf.default(owner)!r}]")
    return parser


def parse_config(cls: type, argv: Optional[Sequence[str]] = None, *, description: str = ""):
    """defaults < YAML (--config) < flags. Returns an instance of cls."""
    args = vars(argument_parser(cls, description).parse_args(argv))
    values: Dict[str, Any] = {}
    config_path = args.pop("config", None)
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {config_path!r} does not exist")
        values.update(_flatten_yaml(yaml.safe_load(path.read_text()) or {}, cls))
    values.update(args)
    return build(cls, values)


def to_dict(cfg: Any) -> Dict[str, Any]:
    """Nested plain dict (tuples as lists), for saving next to a run."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v
    return plain(cfg)


def save_config(cfg: Any, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def markdown_table(cls: type) -> str:
    """| key | flag | default | meaning | for every leaf (the documentation of the fields)."""
    defaults = cls()
    rows: List[str] = ["| key | flag | default | meaning |", "|---|---|---|---|"]
    for leaf in leaves(cls):
        default = leaf.default(_owner(defaults, leaf))
        rows.append(f"| `{leaf.key}` | `{leaf.flag}` | `{default!r}` | {leaf.help} |")
    return "\n".join(rows) + "\n"
