"""Backbones for semantic face image synthesis, behind a timm-style registry.

``forward(x, t, mask) -> v``: x (B, C, H, W) in the model's space, t (B,) in [0, 1], mask (B, K, H, W)
one-hot at image resolution; v has the shape of x (the contract: ``models.backbone.Backbone``; the
conventions: docs/design.md, "Conventions").
"""
from models.backbone import Backbone
from models.registry import UnknownModel, create_model, get_entry, list_models, list_presets, register_model

# Importing the built-in backbones registers them (order = listing order), so the import order is kept as written.
# isort: off
from models import sisma as _sisma  # noqa: F401,E402
from models import dit as _dit  # noqa: F401,E402
from models import sdm as _sdm  # noqa: F401,E402
from models import dim as _dim  # noqa: F401,E402
# isort: on

__all__ = ["Backbone", "UnknownModel", "create_model", "get_entry", "list_models", "list_presets", "register_model"]
