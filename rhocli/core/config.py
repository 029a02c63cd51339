"""Stage options as frozen dataclasses, filled from defaults < a YAML file < CLI flags.

Every stage declares one dataclass (e.g. ``TokenizeConfig``). ``resolve_config`` validates a YAML
mapping against it (unknown keys and wrong types are a ``ConfigError`` naming the file and key), then
applies the flags the user actually gave on the command line. The resolved config is written next to
the stage's output with ``write_resolved_config`` so every artefact says how it was made.

A YAML file may hold the options flat, or under a section named after the stage (``tokenize:``), so one
recipe file can configure several stages.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, TypeVar, Union, get_args, get_origin

from rhocli.core.errors import ConfigError, MissingInputError

C = TypeVar("C")


def load_yaml_mapping(path: Path, section: str | None = None) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; return ``section``'s mapping when present."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({first_line})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    if section is not None and isinstance(data.get(section), dict):
        return dict(data[section])
    return data


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` (the small subset configs use) and normalise it."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(v, item_tp, where) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"config type {tp!r} is not supported by rhocli.core.config")  # programming error


def _in_range(value, rule: str) -> bool:
    """``value`` within ``rule``: ``>= x``, ``> x``, ``<= x``, ``< x``, or an interval ``[a, b)``."""
    rule = rule.strip()
    for op, test in ((">=", lambda v, x: v >= x), ("<=", lambda v, x: v <= x), (">", lambda v, x: v > x),
                     ("<", lambda v, x: v < x)):
        if rule.startswith(op):
            return test(value, float(rule[len(op):]))
    low, high = (float(x) for x in rule[1:-1].split(","))
    return (value >= low if rule[0] == "[" else value > low) and (value <= high if rule[-1] == "]" else value < high)


def range_problems(cfg: Any, names: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """(option, "must be RULE, got VALUE") for each option of ``cfg`` (or of ``names``) outside the
    range its class declares in ``RANGES``."""
    ranges = getattr(type(cfg), "RANGES", {})
    out = []
    for name in (names if names is not None else ranges):
        rule, value = ranges.get(name), getattr(cfg, name, None)
        if rule is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if value != value or not _in_range(value, rule):
            out.append((name, f"must be {rule}, got {value!r}"))
    return out


def resolve_config(
    cls: type[C],
    yaml_path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    section: str | None = None,
) -> C:
    """Build ``cls`` from its defaults, then ``yaml_path`` (if given), then non-None ``overrides``."""
    values = load_yaml_mapping(Path(yaml_path), section) if yaml_path is not None else {}
    return config_from_mapping(cls, values, str(yaml_path), overrides)


def config_from_mapping(
    cls: type[C], values: dict[str, Any], where: str, overrides: dict[str, Any] | None = None
) -> C:
    """Build ``cls`` from a YAML-style mapping (validated; ``where`` names it in errors), then overrides."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    checked: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{where}: unknown option '{key}' (known: {known})")
        checked[name] = _coerce(value, hints[name], f"{where}: option '{key}'")
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in fields:
            raise TypeError(f"{cls.__name__} has no field {name!r}")  # programming error
        checked[name] = value
    missing = [
        name
        for name, f in fields.items()
        if name not in checked
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        from rhocli.core.errors import UsageError

        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise UsageError(f"missing required option(s): {flags} (on the command line or in a config file)")
    cfg = cls(**checked)
    problems = range_problems(cfg, [k for k in checked if k not in (overrides or {})])
    if problems:
        name, problem = problems[0]
        raise ConfigError(f"{where}: option '{name}' {problem}")
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a config dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def write_resolved_config(cfg: Any, path: Path, stage: str) -> None:
    """Write ``cfg`` as ``{stage: {...}}`` YAML; loading it back with ``--config`` reproduces the run."""
    import yaml

    text = yaml.safe_dump({stage: config_to_dict(cfg)}, sort_keys=False, allow_unicode=True)
    Path(path).write_text(text, encoding="utf-8")
