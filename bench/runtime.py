"""Where and how models run: the device choice, precisions, TF32 and CPU threads, decided in one place.

Inference (sampling, timing) runs a model cast once to the precision's dtype (``cast_for_inference``) under the same
``autocast`` as training: the weights then already have autocast's dtype, so it casts none of them on any call (under
``torch.inference_mode`` its weight cache is off, and it would cast every weight on every call otherwise); it only
casts the fp32 intermediates the models compute themselves (time features, position tables). Parameters a module lists
in ``fp32_parameters`` (the selective scan's A, D and step-size bias) stay fp32, and the scan accumulates in fp32.
"""
from __future__ import annotations

import contextlib

import torch

from bench.errors import BenchError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_HELP = "auto (cuda if available), cpu, cuda or cuda:N."


def resolve_device(choice: str | None = "auto") -> torch.device:
    """auto -> cuda when available, else cpu; cpu, cuda and cuda:N as given. A one-line error for anything else,
    or for CUDA on a machine without it."""
    choice = (choice or "auto").strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise BenchError(f"--device {choice}: use {DEVICE_HELP}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device {choice}: no CUDA device is visible (torch {torch.__version__}, CUDA build "
                             f"{torch.version.cuda or 'none'}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BenchError(f"--device {choice}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def check_precision(precision: str) -> torch.dtype:
    """The dtype of a precision name; one-line error naming the choices otherwise."""
    if precision not in PRECISIONS:
        raise BenchError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def autocast(device: torch.device | str, precision: str):
    """bf16/fp16: torch.autocast on the device; fp32: nothing."""
    device = torch.device(device)
    if check_precision(precision) == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


FP32_PARAMETERS = "fp32_parameters"  # module attribute: names of its parameters that inference keeps in fp32
INFERENCE_PRECISION = "inference_precision"  # model attribute set by cast_for_inference


def cast_for_inference(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Cast ``model`` in place, once, to the dtype of ``precision`` for inference (no grad) and return it.

    Floating parameters and buffers take the dtype, except the parameters a module names in its ``fp32_parameters``
    attribute (relative names, e.g. ``dt_proj.bias``), which stay fp32. fp32 leaves the model as it is. The cast is one
    way (the fp32 weights are gone), so only a model the caller owns may be cast; ``model_precision`` reads it back.
    """
    dtype = check_precision(precision)
    if model_precision(model) == precision:
        return model
    if model_precision(model) != "fp32":
        raise ValueError(f"the model was cast to {model_precision(model)} already; load it again for {precision}")
    if dtype == torch.float32:
        return model
    kept = {id(module.get_parameter(name)) for module in model.modules()
            for name in getattr(module, FP32_PARAMETERS, ())}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and p.is_floating_point() and id(p) not in kept and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in module._buffers.items():
            if b is not None and b.is_floating_point():
                module._buffers[name] = b.to(dtype)
    setattr(model, INFERENCE_PRECISION, precision)
    return model


def model_precision(model: torch.nn.Module) -> str:
    """The precision ``cast_for_inference`` gave ``model`` (fp32 for a model it did not cast)."""
    return getattr(model, INFERENCE_PRECISION, "fp32")


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for fp32 matmuls (cuBLAS) and convolutions (cuDNN) on or off inside the block, restored after it.

    Through one API: ``torch.backends.cuda.matmul.fp32_precision`` and ``torch.backends.cudnn.conv.fp32_precision``
    ("tf32" or "ieee") where this torch has them, else the older ``allow_tf32`` flags; torch refuses to read the old
    flags while the new ones hold values set here, which is one more reason to put the previous values back. The flags
    only concern CUDA kernels: on a CPU run they change nothing.
    """
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        flags = [(matmul, "fp32_precision"), (conv, "fp32_precision")]
        value = "tf32" if enabled else "ieee"
    else:
        flags = [(matmul, "allow_tf32"), (cudnn, "allow_tf32")]
        value = bool(enabled)
    before = [getattr(owner, name) for owner, name in flags]
    try:
        for owner, name in flags:
            setattr(owner, name, value)
        yield
    finally:
        for (owner, name), old in zip(flags, before):
            setattr(owner, name, old)


def set_threads(threads: int | None) -> None:
    """torch's intra-op CPU threads (None: leave torch's choice); one-line error for less than one."""
    if threads is None:
        return
    if threads < 1:
        raise BenchError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
