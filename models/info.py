"""Describe backbones without allocating them: parameters are counted on the meta device."""
from __future__ import annotations

import pandas as pd
import torch

from models.registry import create_model, list_models, list_presets


def count_parameters(model: torch.nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe(name: str, preset: str) -> dict:
    """One row: name, preset, parameters, input space and shape, tokens (None for convolutional nets)."""
    with torch.device("meta"):
        model = create_model(name, preset=preset)
    c, h, w = model.input_shape
    return {
        "model": name,
        "preset": preset,
        "params": count_parameters(model),
        "params_M": round(count_parameters(model) / 1e6, 2),
        "space": model.space,
        "input": f"{c}x{h}x{w}",
        "image_px": model.image_size,
        "classes": model.num_classes,
        "tokens": model.num_tokens if model.num_tokens is not None else "-",
    }


def models_table(presets: list[str] | None = None, names: list[str] | None = None) -> str:
    """Markdown table of every backbone at every requested preset it has."""
    known = sorted({p for name in list_models() for p in list_presets(name)})
    unknown = [p for p in presets or [] if p not in known]
    if unknown:
        raise ValueError(f"unknown preset {unknown[0]!r}; available: {', '.join(known)}")
    rows = []
    for name in names or list_models():
        for preset in presets or list_presets(name):
            if preset in list_presets(name):
                rows.append(describe(name, preset))
    df = pd.DataFrame(rows).drop(columns=["params"])
    return df.to_markdown(index=False)
