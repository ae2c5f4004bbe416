"""Setting keys and layers of settings: the one place a `section.field` key (e.g. `model.d_model`) is parsed and
checked, shown by its short name, and where settings are laid over a config, for every source of them: the
command line (`--set`), a study file (fixed, search, variants, forced), a preset and a benchmark plan.

A layer is `{section: {field: value}}`, the form of an ExperimentConfig's dict; a flat `{"section.field": value}`
(a Tune trial's sampled parameters) becomes one with `nest`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

import yaml

from timevlm.config import SECTIONS, check_fields
from timevlm.errors import ConfigError

Layer = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class SettingKey:
    section: str
    field: str

    @classmethod
    def parse(cls, key: str) -> "SettingKey":
        """`key` as a setting, or a ConfigError that says why it is not one (the caller adds where it was)."""
        section, dot, name = str(key).partition(".")
        if not dot or section not in SECTIONS or not name:
            raise ConfigError(f"{key}: not a setting (use section.field, e.g. model.d_model)")
        check_fields(section, [name])
        return cls(section, name)

    def __str__(self) -> str:
        return f"{self.section}.{self.field}"


def is_setting(key: str) -> bool:
    try:
        SettingKey.parse(key)
    except ConfigError:
        return False
    return True


def short_name(key: str) -> str:
    """How tables, tags and console lines show a setting: its field (`model.d_model` -> `d_model`); a key that
    is not `section.field` (a study's `variant`, `cell`) as it is."""
    return key.partition(".")[2] or key


def parse_assignments(items: list[str]) -> dict[str, dict[str, Any]]:
    """`section.field=value` strings (values parsed as YAML, as on the command line) as a layer."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--set expects section.field=value, got {item!r}")
        try:
            k = SettingKey.parse(key)
        except ConfigError as e:
            raise ConfigError(f"--set {item}: {e}") from None
        out.setdefault(k.section, {})[k.field] = yaml.safe_load(value)
    return out


def nest(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """`{"model.d_model": 64}` -> `{"model": {"d_model": 64}}`, every key checked."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        k = SettingKey.parse(key)
        out.setdefault(k.section, {})[k.field] = value
    return out


def lay(base: Layer, *layers: Layer) -> dict[str, dict[str, Any]]:
    """A new config dict: `base` with each layer's settings over it, later layers winning (`base` unchanged)."""
    out = {section: dict(values) for section, values in copy.deepcopy(dict(base)).items()}
    for layer in layers:
        for section, values in layer.items():
            if section not in SECTIONS:
                raise ConfigError(f"{section}: unknown section; use {', '.join(SECTIONS)}")
            out.setdefault(section, {}).update(copy.deepcopy(dict(values)))
    return out
