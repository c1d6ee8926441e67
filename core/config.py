"""Typed job configs: YAML presets in ``configs/`` plus ``--set key=value`` overrides.

Every job describes its settings as a (nested) dataclass with a docstring under each field. ``load_config`` reads a
YAML file, applies dotted overrides (``--set train.lr=3e-4 --set model.preset=tiny``), and builds the dataclass,
rejecting unknown keys and wrongly typed values with a message that names the file and the field. ``run_job`` is
every command's ``main``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import types
import typing
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be run: unknown field, wrong type, contradictory or out-of-range values. Every
    config in the project raises this one, with a message that names the field (and the file, when loaded from one)."""


T = TypeVar("T")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, or the name of a preset in configs/ (``tiny`` → configs/tiny.yaml)."""
    p = Path(name)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / f"{name}.yaml", CONFIG_DIR / str(name)):
        if cand.exists():
            return cand
    known = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {str(name)!r} not found (not a file, nor a preset in configs/: {known})")


_EXP_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
"""A float in exponent notation, which PyYAML (YAML 1.1) leaves as a string when it has no dot (``1e-3``)."""

def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` → ``{"a": {"b": 1}, "c": "x"}``; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set has an empty key in {pair!r}")
        value = yaml.safe_load(raw) if raw else ""
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {part!r} is set to a value and also used as a section")
        node[leaf] = value
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; nested dataclasses are built recursively."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXP_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 3e-4 (exponent without a dot) as a string, not a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return str(value)
    if tp is Path:
        return Path(str(value))
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError naming the field."""
    if "from_dict" in vars(cls):  # the class validates its own dict (ModelArgs: presets)
        try:
            return cls.from_dict(data, source=where)  # type: ignore[attr-defined]
        except TypeError as e:  # e.g. ModelArgs given a wrong type
            raise ConfigError(f"{where}: {e}") from e
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML-safe values (Paths become strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], str]:
    """A YAML file or preset as a mapping, and the path it came from.

    ``extends: OTHER`` (a preset name or a path relative to this file) starts from OTHER's mapping and merges this
    file's keys over it, section by section, so a preset states only how it differs (sft-tiny and dpo-tiny extend finetune-tiny).
    """
    p = resolve_config_path(path)
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping, got {type(loaded).__name__}")
    base = loaded.pop("extends", None)
    if base is None:
        return loaded, str(p)
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{p}: extends must name one preset or file, got {base!r}")
    if p.resolve() in _seen:
        raise ConfigError(f"{p}: extends loops back to itself ({' → '.join(str(s) for s in _seen + (p,))})")
    near = p.parent / base
    parent, _ = read_yaml(near if near.is_file() else base, _seen + (p.resolve(),))
    return deep_merge(parent, loaded), str(p)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None, *,
                ignore_other_sections: bool = False) -> T:
    """YAML file (or preset name) + ``key=value`` overrides → a validated ``cls``.

    ``ignore_other_sections``: top-level YAML keys that ``cls`` lacks are skipped (a job reading another job's preset,
    e.g. ``clean`` on a pretrain YAML); overrides stay strict either way.
    """
    data: dict[str, Any] = {}
    where = cls.__name__
    if path is not None:
        data, where = read_yaml(path)
        if ignore_other_sections:
            known = {f.name for f in dataclasses.fields(cls)}
            data = {k: v for k, v in data.items() if k in known}
    data = deep_merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data, where)


def job_arg_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The two options every job shares: ``--config`` and repeated ``--set key=value``."""
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", "-c", help="YAML file or preset name in configs/ (e.g. tiny)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config field, dotted for nesting (repeatable)")
    return ap


@dataclasses.dataclass(frozen=True)
class Flag:
    """A command-line shortcut for one override: ``--model DIR`` for ``--set model=DIR``, ``--no-serve`` for
    ``--set serve.enabled=false``."""

    name: str
    """The option, e.g. "--model"."""
    help: str
    """Its line in ``--help``."""
    override: str
    """The override it stands for; "{}" takes the flag's value (a flag without "{}" is a switch)."""


def run_job(name: str, doc: str | None, argv: list[str] | None, cls: type[T], fn: Callable[[T], Any], *,
            show: Callable[[Any, T], None] | None = None, errors: tuple[type[Exception], ...] = (),
            flags: tuple[Flag, ...] = (), load: Callable[..., T] | None = None) -> int:
    """A command's ``main``: ``--config``/``--set`` (and ``flags``) build ``cls`` (``load``, default
    ``load_config``), then ``fn(cfg)`` runs. Its result is printed as one JSON line, or handed to
    ``show(result, cfg)``. A ConfigError — or one of ``errors``, the bad-input exceptions of this command — is one
    line ``llamaray NAME: message`` on stderr and exit status 2; anything else is a bug and keeps its traceback."""
    prog = f"llamaray {name}"
    ap = job_arg_parser(prog, doc)
    for f in flags:
        if "{}" in f.override:
            ap.add_argument(f.name, help=f.help)
        else:
            ap.add_argument(f.name, action="store_true", help=f.help)
    args = ap.parse_args(argv)
    overrides = list(args.overrides)
    for f in flags:
        value = getattr(args, f.name.lstrip("-").replace("-", "_"))
        if value:
            overrides.append(f.override.format(value) if "{}" in f.override else f.override)
    try:
        cfg = (load or load_config)(cls, args.config, overrides)
        result = fn(cfg)
    except (ConfigError, *errors) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if show is None:
        print(json.dumps(result, default=str), flush=True)
    else:
        show(result, cfg)
    return 0
