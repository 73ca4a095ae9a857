"""FLOPs of one network evaluation, counted without running anything: shapes on the meta device.

Two parts, reported separately and summed:
- ``counter``: ``torch.utils.flop_counter.FlopCounterMode`` over the forward (matmuls, convolutions,
  attention), counting a multiply-add as two FLOPs;
- ``scan``: the selective scan, which such counters do not see (a fused kernel or an elementwise loop),
  taken from ``models.ssm.count_scan_flops`` (about 9 * B * L * D * N per scan).

Cost is compared across backbones against a common token count: the number of 16 x 16-pixel patches of
the image (``equivalent_tokens``), the footprint of one SISMA/DiT token at the paper preset (SD-VAE
factor 8 x patch 2). The UNet has no tokens of its own; since every such count is proportional to the
pixel count, the fitted exponent does not depend on the footprint chosen.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.ssm import count_scan_flops

# Side, in image pixels, of the patch that defines one comparable token (SD-VAE factor 8 x patch 2).
TOKEN_FOOTPRINT_PX = 16


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward: what FlopCounterMode saw plus the selective scans it cannot see."""

    counter: int
    scan: int

    @property
    def total(self) -> int:
        return self.counter + self.scan


def count_flops(fn, *args, **kwargs) -> FlopCount:
    """Run ``fn(*args, **kwargs)`` under both counters (no gradients) and return its FLOPs.

    Works with meta tensors, so a paper-size model costs neither memory nor time.
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter, count_scan_flops() as scan:
        fn(*args, **kwargs)
    return FlopCount(counter=int(counter.get_total_flops()), scan=int(scan.flops))


def example_inputs(model: torch.nn.Module, batch_size: int, device: torch.device | str,
                   dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None):
    """(x, t, mask) for one forward of ``model``: Gaussian x, uniform t, a random one-hot mask.

    On the meta device only shapes exist, so the tensors are left empty.
    """
    device = torch.device(device)
    c, h, w = model.input_shape
    k, s = model.num_classes, model.image_size
    if device.type == "meta":
        return (torch.empty(batch_size, c, h, w, device=device, dtype=dtype),
                torch.empty(batch_size, device=device, dtype=dtype),
                torch.empty(batch_size, k, s, s, device=device, dtype=dtype))
    x = torch.randn(batch_size, c, h, w, generator=generator).to(device, dtype)
    t = torch.rand(batch_size, generator=generator).to(device, dtype)
    labels = torch.randint(0, k, (batch_size, s, s), generator=generator)
    mask = torch.nn.functional.one_hot(labels, k).permute(0, 3, 1, 2).to(device, dtype)  # (B, K, S, S)
    return x, t, mask


def equivalent_tokens(image_size: int) -> float:
    """Comparable token count of an image: its number of 16 x 16-pixel patches (see module docstring)."""
    return (image_size / TOKEN_FOOTPRINT_PX) ** 2


def fit_power_law(x, y) -> tuple[float, float] | None:
    """Least-squares fit of y = a * x**k on log-log axes; (k, a), or None with fewer than 2 distinct x."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[keep], y[keep]
    if np.unique(x).size < 2:
        return None
    k, log_a = np.polyfit(np.log(x), np.log(y), 1)
    return float(k), float(np.exp(log_a))
