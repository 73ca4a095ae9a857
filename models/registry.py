"""Backbone registry in the shape of timm's: register a constructor, list it, create it by name.

A backbone module registers a constructor taking a preset name and keyword overrides:

    @register_model("sisma", presets=SISMA_PRESETS)
    def sisma(preset: str = "paper", **overrides) -> nn.Module: ...

Third-party backbones register through the entry-point group ``sis_bench.backbones``; each entry
point names a module (or a callable) that, when loaded, registers its models. They show up in
``bench models`` and every ``--models`` option without editing this repository.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Callable, Mapping

import torch.nn as nn

ENTRY_POINT_GROUP = "sis_bench.backbones"


class UnknownModel(LookupError):
    """A backbone name or preset the registry does not know; the message lists what exists."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown model"


@dataclass(frozen=True)
class ModelEntry:
    """One registered backbone: its constructor and the names of its size presets."""

    name: str
    fn: Callable[..., nn.Module]
    presets: tuple[str, ...]


_REGISTRY: dict[str, ModelEntry] = {}
_PLUGINS_LOADED = False


def register_model(name: str, presets: Mapping[str, object] | tuple[str, ...]):
    """Decorator: register ``fn(preset, **overrides) -> nn.Module`` under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelEntry(name, fn, tuple(presets))
        return fn

    return wrap


def _load_plugins() -> None:
    """Import every entry point of the plugin group once; a broken plugin is reported, not fatal."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            # A module registers on import; a function is called to register. An entry point naming an
            # already registered constructor is left alone (calling it would build a model).
            constructors = {entry.fn for entry in _REGISTRY.values()}
            if callable(obj) and not isinstance(obj, type) and obj not in constructors:
                obj()
        except Exception as e:  # a plugin must not take the harness down with it
            import warnings

            warnings.warn(f"backbone plugin {ep.name!r} ({ep.value}) failed to load: {e}", stacklevel=2)


def list_models() -> list[str]:
    """Names of all registered backbones in registration order: built-in first, then plugins."""
    _load_plugins()
    return list(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; a one-line error listing what exists otherwise."""
    _load_plugins()
    if name not in _REGISTRY:
        raise UnknownModel(f"unknown model {name!r}; available: {', '.join(_REGISTRY) or 'none'}")
    return _REGISTRY[name]


def list_presets(name: str) -> list[str]:
    """Preset names of one backbone."""
    return list(get_entry(name).presets)


def create_model(name: str, preset: str = "paper", **overrides) -> nn.Module:
    """Build backbone ``name`` at size ``preset``; keyword overrides replace preset fields."""
    entry = get_entry(name)
    if preset not in entry.presets:
        raise UnknownModel(f"unknown preset {preset!r} for model {name!r}; available: {', '.join(entry.presets)}")
    return entry.fn(preset=preset, **overrides)
