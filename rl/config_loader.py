"""YAML recipes -> typed dataclasses, with errors that name the file, the line and the key.

Generic over the dataclass (`rl/config.py` holds uniloop's sections). Every field carries a help
text (`uf(default, "help")`); a section may define `_validate(prefix, src)` for checks across its
fields, and a field's `choices` may be a callable (asked at load time: a registry's current names).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml


def uf(default=dataclasses.MISSING, help: str = "", choices=None, factory=None, ge=None, gt=None, le=None, lt=None):
    """A dataclass field with help text, optional allowed values (a tuple, or a callable giving them) and
    optional bounds for numbers (ge: >=, gt: >, le: <=, lt: <; checked at load, None values exempt)."""
    meta = {"help": help, "bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}}
    if choices is not None:
        meta["choices"] = choices if callable(choices) else tuple(choices)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- loading
class ConfigError(ValueError):
    """A config problem; the message names the file, line and key."""


class _Src:
    """Where a value came from: file + line, or a --set override."""

    def __init__(self, file: str, lines: dict[str, int], overridden: set[str]):
        self.file, self.lines, self.overridden = file, lines, overridden

    def where(self, key: str) -> str:
        if key in self.overridden:
            return f"--set {key}"
        k = key
        while k:
            if k in self.lines:
                return f"{self.file}:{self.lines[k]}"
            k = k.rpartition(".")[0]
        return self.file


def _compose_with_lines(text: str, file: str) -> tuple[Any, dict[str, int]]:
    """yaml.safe_load plus a map dotted-key -> line number (1-based)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"{file}:{mark.line + 1}" if mark else file
        raise ConfigError(f"{loc}: not valid YAML: {getattr(e, 'problem', e)}") from None
    lines: dict[str, int] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                if key in lines:  # YAML would silently keep the last one
                    raise ConfigError(f"{file}:{k.start_mark.line + 1}: key '{key}' appears twice (first at line "
                                      f"{lines[key]}); keep one")
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                key = f"{prefix}[{i}]"
                lines[key] = v.start_mark.line + 1
                walk(v, key)

    if node is not None:
        walk(node, "")
    return data, lines


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _help_type(tp) -> str:
    """`float | None` -> `float or null` (no `|`, which separates the columns of the help table)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _help_type(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "") if typing.get_args(tp) else _type_name(tp)


def _convert(value, tp, key: str, src: _Src):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _convert(value, a, key, src)
            except ConfigError as e:
                errors.append(e)
        raise errors[-1]
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{src.where(key)}: key '{key}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key, src)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{src.where(key)}: key '{key}' must be a list, got {type(value).__name__} {value!r}")
        return [_convert(v, args[0] if args else Any, f"{key}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{src.where(key)}: key '{key}' must be a mapping, got {type(value).__name__}")
        return dict(value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{src.where(key)}: key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):  # YAML reads 1e-4 as a string; accept what float() accepts
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{src.where(key)}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{src.where(key)}: key '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{src.where(key)}: key '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{src.where(key)}: key '{key}' must be a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str, src: _Src):
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in known:
            close = difflib.get_close_matches(str(k), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"{src.where(key)}: unknown key '{key}'{hint}")
        value = _convert(v, hints[k], key, src)
        choices = known[k].metadata.get("choices")
        if callable(choices):
            choices = tuple(choices())
        if choices is not None and value not in choices:
            raise ConfigError(f"{src.where(key)}: key '{key}' must be one of {list(choices)}, got {value!r}")
        _check_bounds(value, known[k].metadata.get("bounds") or {}, key, src)
        kwargs[k] = value
    missing = [f.name for f in known.values()
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{src.where(prefix) if prefix else src.file}: missing required key "
                          f"'{(prefix + '.') if prefix else ''}{missing[0]}'")
    obj = cls(**kwargs)
    check = getattr(obj, "_validate", None)
    if check:
        check(prefix, src)
    return obj


_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _check_bounds(value, bounds: dict, key: str, src: _Src):
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for name, bound in bounds.items():
        sign, ok = _BOUNDS[name]
        if not ok(value, bound):
            raise ConfigError(f"{src.where(key)}: key '{key}' must be {sign} {bound}, got {value!r}")


def _set_dotted(data: dict, dotted: str, value):
    parts = dotted.split(".")
    cur = data
    for i, p in enumerate(parts[:-1]):
        if "[" in p:  # rewards[0].weight
            name, idx = p[:-1].split("[")
            cur = _list_item(cur.setdefault(name, []), name, idx, dotted)
            continue
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{'.'.join(parts[:i + 1])}' is not a mapping")
        cur = nxt
    last = parts[-1]
    if "[" in last:
        name, idx = last[:-1].split("[")
        items = cur.get(name) or []
        _list_item(items, name, idx, dotted)
        items[int(idx)] = value
    else:
        cur[last] = value


def _list_item(items, name: str, idx: str, dotted: str):
    """items[idx] for a --set path, or a clear error (not an index, not a list, out of range)."""
    if not isinstance(items, list):
        raise ConfigError(f"--set {dotted}: '{name}' is not a list")
    if not idx.lstrip("-").isdigit():
        raise ConfigError(f"--set {dotted}: '{idx}' is not a list index")
    if not -len(items) <= int(idx) < len(items):
        have = f"{name}[0]..{name}[{len(items) - 1}]" if items else "none"
        raise ConfigError(f"--set {dotted}: the config has {len(items)} {name} entries ({have}); "
                          f"set the whole list to add one, e.g. --set '{name}=[...]'")
    return items[int(idx)]


def parse_overrides(items: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value (e.g. --set grpo.learning_rate=1e-4)")
        k, v = item.split("=", 1)
        try:
            out.append((k.strip(), yaml.safe_load(v) if v.strip() else None))
        except yaml.YAMLError:
            out.append((k.strip(), v))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, text: str | None = None,
                cls=None):
    """Load a YAML recipe (or `text`) into `cls`, applying `--set` overrides; errors name file/line/key."""
    file = str(path) if path is not None else "<config>"
    if text is None:
        if path is None:
            text = ""
        else:
            p = Path(path)
            if not p.exists():
                raise ConfigError(f"{file}: config file not found")
            if p.is_dir():
                raise ConfigError(f"{file}: is a directory, not a YAML config file")
            try:
                text = p.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"{file}: cannot read the config: {e}") from None
            if not text.strip():
                raise ConfigError(f"{file}: the config file is empty")
    data, lines = _compose_with_lines(text, file)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}:1: the top level must be a mapping of keys, got {type(data).__name__}")
    over = parse_overrides(overrides)
    for k, v in over:
        _set_dotted(data, k, v)
    src = _Src(file, lines, {k for k, _ in over})
    cfg = _build(cls, data, "", src)
    object.__setattr__(cfg, "_source", src)  # where each key came from, for checks after loading
    return cfg


def source_of(cfg) -> "_Src":
    """Where the keys of a loaded config came from (file:line or --set); a bare `<config>` otherwise."""
    return getattr(cfg, "_source", None) or _Src("<config>", {}, set())


def save_yaml(data: dict, path: str | Path):
    """Write `data` (a config as a dict) as YAML in field order."""
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def config_help(cls, prefix: str = "") -> list[str]:
    """One line per field: dotted key, type, default, help (for the README and `uniloop config-help`)."""
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = typing.get_type_hints(cls)[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        sub = tp if dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING and sub is None:
            default = f.default_factory()
        else:
            default = "" if sub else "(required)"
        out.append(f"{key} | {_help_type(tp)} | {default!r} | {f.metadata.get('help', '')}"
                   if sub is None else f"{key} | section | | {f.metadata.get('help', '')}")
        if sub is not None:
            out.extend(config_help(sub, key + ("[].") if typing.get_origin(tp) is list else key + "."))
    return out


def config_reference_markdown(cls) -> str:
    """The README's config reference table (`uniloop config-help --markdown`; a test keeps them equal)."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for line in config_help(cls):
        key, tp, rest = line.split(" | ", 2)
        if tp == "section":  # "key | section | | help"
            help_ = rest.removeprefix("| ").replace("|", "\\|")
            rows.append(f"| **`{key}`** | section | | {help_} |")
            continue
        default, help_ = rest.split(" | ", 1)
        help_ = help_.replace("|", "\\|")
        default = {"None": "null", "True": "true", "False": "false"}.get(default, default).replace("|", "\\|")
        rows.append(f"| `{key}` | {tp} | `{default}` | {help_} |")
    return "\n".join(rows)
