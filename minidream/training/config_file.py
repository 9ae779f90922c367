"""YAML files and `section.key=value` overrides -> frozen config dataclasses, and back.

Every value is type-checked against its dataclass field; an unknown key is an error that
names the closest valid key, so a typo never silently trains with a default.
"""

import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml

from minidream.config import TrainConfig
from minidream.files import atomic_file


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclasses."""


# Keys whose value is one of a few names: checked once the config is complete.
CHOICES = {
    "model.architecture": ("sd15", "tiny"),
    "data.class_sampler": ("ddim", "ddpm", "euler-a", "dpmpp-2m"),
    "train.lr_schedule": ("constant", "linear", "cosine"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
    "run.export_dtype": ("fp16", "fp32"),
}
# Counts and intervals: zero or less would divide by zero or train nothing.
POSITIVE = (
    "train.max_steps", "train.batch_size", "train.gradient_accumulation_steps", "train.max_nonfinite_steps",
    "checkpoint.every_n_steps", "checkpoint.keep_last", "run.log_every_n_steps", "validation.every_n_steps",
)


def load_train_config(path: str | Path | None, overrides: list[str]) -> TrainConfig:
    """Read a YAML preset (or start from the defaults), then apply `a.b=c` overrides in order."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    config = from_dict(TrainConfig, data, where=str(path or "config"))
    for override in overrides:
        config = apply_override(config, override)
    check_values(config)
    return config


def check_values(config: TrainConfig) -> None:
    """Values the types allow but training cannot use: names outside their choices, counts below 1."""
    def value(dotted: str):
        section, key = dotted.split(".")
        return getattr(getattr(config, section), key)

    for dotted, allowed in CHOICES.items():
        if value(dotted) not in allowed:
            raise ConfigError(f"{dotted}={value(dotted)!r} is not one of {', '.join(allowed)}")
    for dotted in POSITIVE:
        if value(dotted) < 1:
            raise ConfigError(f"{dotted} must be at least 1, got {value(dotted)}")


def from_dict(cls: type, data: dict, where: str):
    """Build dataclass `cls` from a (nested) mapping, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggestion(key, fields)}")
        values[key] = _coerce(value, hints[key], f"{where}: {key}")
    return cls(**values)


def apply_override(config, override: str):
    """Return `config` with one `section.key=value` override applied (value parsed as YAML)."""
    dotted, sep, raw = override.partition("=")
    if not sep or not dotted:
        raise ConfigError(f"override {override!r} is not of the form section.key=value")
    return _replace_path(config, dotted.split("."), raw, dotted)


def to_dict(config) -> dict:
    """Plain nested dict (tuples as lists) for writing YAML."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def save_config(config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: temp file, then rename)."""
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def _replace_path(config, keys: list[str], raw: str, dotted: str):
    fields = {f.name for f in dataclasses.fields(config)}
    key = keys[0]
    if key not in fields:
        raise ConfigError(f"override {dotted!r}: unknown key {key!r}{_suggestion(key, fields)}")
    current = getattr(config, key)
    if len(keys) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"override {dotted!r}: {key!r} is a value, not a section")
        return dataclasses.replace(config, **{key: _replace_path(current, keys[1:], raw, dotted)})
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"override {dotted!r}: {key!r} is a section; set one of its keys, e.g. {key}.<key>=...")
    hint = typing.get_type_hints(type(config))[key]
    value = yaml.safe_load(raw) if raw.strip() else None
    if str in _members(hint) and not isinstance(value, str) and value is not None:
        value = raw  # a prompt like "1984" stays the text the user typed
    return dataclasses.replace(config, **{key: _coerce(value, hint, f"override {dotted}")})


def _members(hint) -> tuple:
    """The alternatives of a `X | Y` annotation, or (hint,) for a plain one."""
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def _coerce(value, hint, where: str):
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    members = _members(hint)
    if value is None:
        if type(None) in members:
            return None
        raise ConfigError(f"{where}: must not be empty")
    for member in members:
        if member is bool and isinstance(value, bool):
            return value
        if member is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if member is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if member is float and isinstance(value, str):
            try:  # YAML 1.1 reads "1e-6" (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if member is str and isinstance(value, str):
            return value
        if typing.get_origin(member) is tuple and isinstance(value, list):
            (item,) = {a for a in typing.get_args(member) if a is not Ellipsis}
            return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    expected = " or ".join(_type_name(m) for m in members)
    quote = " (YAML reads yes/no/on/off as booleans: quote the word, e.g. \"no\")" if isinstance(value, bool) else ""
    raise ConfigError(f"{where}: expected {expected}, got {value!r}{quote}")


def _type_name(hint) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list"
    return "null" if hint is type(None) else hint.__name__


def _suggestion(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (valid: {', '.join(sorted(valid))})"
