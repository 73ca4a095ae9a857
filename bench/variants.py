"""Backbones as the harness names them: a registered model, optionally with config overrides (a variant).

``--models sisma,sisma:scan=raster:conv=causal1d,dit:cond=add`` names three variants. A variant is a
registered backbone plus ``key=value`` overrides of its config dataclass; values are parsed by the field's type.
Its name (overrides sorted by key) labels every row, table, plot and run folder; ``slug`` is the same name with
only filesystem-safe characters. ``build_model`` is the one place a backbone is constructed.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

import models
from bench.errors import BenchError

SEPARATOR = ":"


@dataclass(frozen=True)
class Variant:
    """A registered backbone and the config overrides that make this variant of it."""

    model: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        return SEPARATOR.join([self.model, *(f"{k}={_text(v)}" for k, v in self.overrides)])

    @property
    def slug(self) -> str:
        """The name with only [A-Za-z0-9_.-]: ``sisma:scan=raster`` -> ``sisma_scan-raster``."""
        text = "_".join([self.model, *(f"{k}-{_text(v)}" for k, v in self.overrides)])
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)

    def kwargs(self) -> dict:
        return dict(self.overrides)

    def __str__(self) -> str:
        return self.name


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def config_fields(model: str) -> dict[str, dataclasses.Field]:
    """The config dataclass fields of a registered backbone (built on the meta device at its first preset)."""
    entry = models.get_entry(model)
    with torch.device("meta"):
        config = models.create_model(model, preset=entry.presets[0]).config
    return {f.name: f for f in dataclasses.fields(config)}


def _parse_value(model: str, f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if not isinstance(f.type, str) else f.type.split("|")[0].strip()
    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(kind, kind)
    if typing.get_origin(kind) is not None:
        kind = typing.get_args(kind)[0]
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if kind in (int, float):
            return kind(raw)
    except ValueError:
        raise BenchError(f"{model}:{f.name}={raw}: {f.name} takes a {kind.__name__}") from None
    if kind is str:
        return raw
    raise BenchError(f"{model}:{f.name}: this field ({f.type}) cannot be set from the command line")


def parse_variant(text: str) -> Variant:
    """``model[:key=value...]`` -> Variant, checked: the model exists, each key is a config field, each value
    parses and builds (one-line errors listing what exists)."""
    parts = [p.strip() for p in text.strip().split(SEPARATOR)]
    model = parts[0]
    if model not in models.list_models():
        raise BenchError(f"unknown model {model!r}; available: {', '.join(models.list_models())}")
    fields = config_fields(model)
    overrides = {}
    for part in parts[1:]:
        key, eq, raw = part.partition("=")
        if not eq or not key:
            raise BenchError(f"{text}: overrides are written key=value after the model, e.g. sisma:scan=raster")
        if key not in fields:
            raise BenchError(f"{text}: {model} has no config field {key!r}; available: {', '.join(fields)}")
        if key in overrides:
            raise BenchError(f"{text}: {key} is given twice; give each config field once")
        overrides[key] = _parse_value(model, fields[key], raw)
    variant = Variant(model, tuple(sorted(overrides.items())))
    entry = models.get_entry(model)
    try:
        with torch.device("meta"):
            models.create_model(model, preset=entry.presets[0], **variant.kwargs())
    except (ValueError, TypeError) as e:
        raise BenchError(f"{text}: {str(e).splitlines()[0]}") from None
    return variant


def parse_models(text: str | list[str]) -> list[Variant]:
    """A comma-separated list (or a list) of variants, duplicates removed, order kept."""
    items = text.split(",") if isinstance(text, str) else list(text)
    variants = list(dict.fromkeys(parse_variant(t) for t in items if str(t).strip()))
    if not variants:
        raise BenchError("--models is empty; name one or more backbones, e.g. sisma,dit,sdm")
    return variants


def build_model(model: str | Variant, preset: str, overrides: dict | None = None,
                device: torch.device | str | None = None) -> nn.Module:
    """The backbone or variant ``model`` at ``preset`` with further config ``overrides``, on ``device`` (None: the
    current default device): the one place a backbone is built."""
    if isinstance(model, Variant) or SEPARATOR in model:
        variant = model if isinstance(model, Variant) else parse_variant(model)
        model, overrides = variant.model, {**variant.kwargs(), **(overrides or {})}
    # a config read back from JSON holds lists where the dataclass holds tuples
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in (overrides or {}).items()}
    try:
        if device is None:
            return models.create_model(model, preset=preset, **(overrides or {}))
        with torch.device(device):
            return models.create_model(model, preset=preset, **(overrides or {}))
    except (ValueError, TypeError) as e:
        raise BenchError(f"{model} at preset {preset!r}: {str(e).splitlines()[0]}") from None
