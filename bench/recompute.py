"""Activation checkpointing per block: a block's activations are not kept for backward but recomputed there.

The blocks of a backbone are found by name: the modules in its ``blocks`` list (SISMA and DiT-SIS: one
``AdaLNZeroBlock`` each), and its ``encoder`` and ``decoder`` lists and ``middle`` stage (SDM: each ``Stage``). A
block's ``forward`` is replaced, on that instance only, by one that runs the class's forward through
``torch.utils.checkpoint.checkpoint`` (non-reentrant) when gradients are on: only the block's inputs are saved, and
backward runs the block's forward once more (about a third more compute per training step). The parameters, their
names and the state dict do not change, so checkpoints load either way, and without gradients (sampling, EMA)
nothing changes at all. The recomputation repeats the same operations on the same inputs, so on a deterministic
device the gradients are the same bit for bit (``tests/test_train.py``).
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from bench.errors import BenchError

BLOCK_LISTS = ("blocks", "encoder", "decoder")  # nn.ModuleList attributes whose entries are blocks
BLOCK_MODULES = ("middle",)  # single-module attributes that are one block


def blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that activation checkpointing wraps, in forward order (see the module docstring)."""
    found = []
    for name in ("encoder", "blocks", "middle", "decoder"):
        part = getattr(model, name, None)
        if isinstance(part, nn.ModuleList) and name in BLOCK_LISTS:
            found.extend(part)
        elif isinstance(part, nn.Module) and name in BLOCK_MODULES:
            found.append(part)
    return found


def _checkpointed_forward(self, *args, **kwargs):
    forward = type(self).forward
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    return checkpoint(forward, self, *args, use_reentrant=False, **self._checkpoint_options, **kwargs)


def enable(model: nn.Module, **options) -> int:
    """Checkpoint every block of ``model`` (``options`` go to ``torch.utils.checkpoint.checkpoint``); returns the
    number of blocks. A one-line error for a model without blocks that this module knows."""
    found = blocks(model)
    if not found:
        raise BenchError(f"{type(model).__name__} has no blocks to checkpoint (no {', '.join(BLOCK_LISTS)} list and "
                         f"no {', '.join(BLOCK_MODULES)} module); train it without --checkpointing")
    for block in found:
        block._checkpoint_options = options
        block.forward = types.MethodType(_checkpointed_forward, block)
    return len(found)


def enabled(model: nn.Module) -> bool:
    """True when ``enable`` wrapped the blocks of ``model``."""
    return any(hasattr(b, "_checkpoint_options") for b in blocks(model))
