"""`bench doctor`: what a GPU run on this machine will use, and what is missing, before any time is spent.

Checked: torch and its CUDA build, the GPUs and their memory, mamba-ssm and causal-conv1d (each imported under a
guard, with their compiled kernels, reporting the original error text), the SDPA backends (on a GPU, a tiny call
through each), the weight files (SD-VAE, Inception, AlexNet) where the harness looks for them, and the memory plan of
the ``paper`` preset (``bench.plan``) of every built-in backbone (``PLANNED``) for the first GPU's memory (or the
paper's 24 GiB where there is none). Nothing is downloaded and nothing is written.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from dataclasses import dataclass

import torch

from bench.autoencoder import SD_VAE, load_vae
from bench.errors import BenchError
from bench.metrics import ALEXNET_WEIGHTS, INCEPTION_WEIGHTS, resolve_weights
from bench.plan import DEFAULT_MEMORY, parse_memory, plan, size_text, table

NO_CUDA = "no CUDA"
PLANNED = ("sisma", "dit", "sdm", "dim")  # the backbones whose memory plan the report shows


@dataclass
class Check:
    """One line of the report: ``ok`` True (usable), False (missing: a GPU run will lack it) or None (information)."""

    section: str
    name: str
    value: str
    ok: bool | None = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import(module: str) -> str | None:
    """None when ``module`` imports, else the error's first line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a broken extension raises anything from ImportError to OSError
        return _first_line(e)
    return None


def torch_checks() -> list[Check]:
    v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    cudnn = f"{v // 10000}.{v // 100 % 100}.{v % 100}" if v else "none"
    out = [Check("torch", "torch", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'}, cuDNN {cudnn})",
                 None)]
    if torch.cuda.is_available():
        out.append(Check("torch", "CUDA", f"available: {torch.cuda.device_count()} GPU(s), driver CUDA "
                         f"{_driver_version()}", True))
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            bf16 = "yes" if torch.cuda.is_bf16_supported() else "no"
            out.append(Check("torch", f"GPU {i}", f"{p.name}, {p.total_memory / 2 ** 30:.1f} GiB, compute "
                             f"capability {p.major}.{p.minor}, bf16 {bf16}", None))
    else:
        why = "this torch has no CUDA build" if torch.version.cuda is None else \
            "torch.cuda.is_available() is False (no NVIDIA driver or no visible GPU)"
        out.append(Check("torch", "CUDA", f"{NO_CUDA}: {why}; everything runs on the CPU", False))
    return out


def _driver_version() -> str:
    try:
        v = torch._C._cuda_getDriverVersion()
        return f"{v // 1000}.{v % 1000 // 10}"
    except Exception:  # noqa: BLE001
        return "unknown"


def kernel_checks() -> list[Check]:
    """mamba-ssm's selective scan and causal-conv1d's conv: installed, importable, compiled kernels loadable."""
    out = []
    packages = [
        ("mamba-ssm", "mamba_ssm.ops.selective_scan_interface", "selective_scan_cuda",
         "MAMBA_KEEP_CUDA_BUILD=TRUE pip install mamba-ssm --no-build-isolation"),
        ("causal-conv1d", "causal_conv1d", "causal_conv1d_cuda", "pip install causal-conv1d --no-build-isolation"),
    ]
    for dist, module, kernel, install in packages:
        version = _version(dist) or _version(dist.replace("-", "_"))
        if version is None:
            out.append(Check("kernels", dist, f"not installed ({install}); SISMA falls back to the PyTorch "
                             f"implementation on a GPU", False))
            continue
        error = _import(module) or _import(kernel)
        if error:
            out.append(Check("kernels", dist, f"{version} installed, but its CUDA op does not load: {error} "
                             f"(reinstall: {install})", False))
        else:
            out.append(Check("kernels", dist, f"{version}, CUDA op loads ({kernel})", True))
    out.append(Check("kernels", "SISMA scan on a GPU", _scan_choice(out), None))
    out.append(sdpa_check())
    return out


def _scan_choice(kernels: list[Check]) -> str:
    import os

    forced = os.environ.get("SIS_BENCH_SCAN", "auto").strip().lower() or "auto"
    mamba, conv = (next(c for c in kernels if c.name == name) for name in ("mamba-ssm", "causal-conv1d"))
    chosen = "mamba-ssm's kernel" if mamba.ok else "the chunked PyTorch scan (slower, more memory)"
    if mamba.ok and conv.ok and forced == "auto":
        chosen += ("; Self-Mamba (SISMA with the causal conv, every DiM block) through mamba-ssm's fused "
                   "mamba_inner_fn (scan_backend cuda-fused)")
    return f"{chosen} (SIS_BENCH_SCAN={forced})"


def sdpa_check() -> Check:
    """The SDPA backends torch may choose from, and on a GPU whether each runs a tiny bf16 call."""
    b = torch.backends.cuda
    enabled = {"flash": b.flash_sdp_enabled(), "mem-efficient": b.mem_efficient_sdp_enabled(),
               "cudnn": getattr(b, "cudnn_sdp_enabled", lambda: False)(), "math": b.math_sdp_enabled()}
    if not torch.cuda.is_available():
        names = ", ".join(k for k, on in enabled.items() if on)
        return Check("kernels", "SDPA backends", f"enabled: {names}; not probed ({NO_CUDA})", None)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "mem-efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    results = []
    for name, backend in backends.items():
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            results.append(f"{name} runs")
        except Exception as e:  # noqa: BLE001
            results.append(f"{name} fails ({_first_line(e)})")
    ok = any(r.startswith(("flash", "mem-efficient", "cudnn")) and r.endswith("runs") for r in results)
    return Check("kernels", "SDPA backends", "; ".join(results), ok)


def weight_checks() -> list[Check]:
    """The SD-VAE (latent models), Inception (FID/KID) and AlexNet (LPIPS) weights, where the harness looks."""
    out = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_vae(SD_VAE)
        out.append(Check("weights", "SD-VAE", f"{SD_VAE} found in the Hugging Face cache", True))
    except (BenchError, OSError, ValueError, ImportError) as e:
        out.append(Check("weights", "SD-VAE", str(e).splitlines()[0], False))
    for spec in (INCEPTION_WEIGHTS, ALEXNET_WEIGHTS):
        try:
            path = resolve_weights(spec)
            out.append(Check("weights", spec.label, f"found: {path.name} (SHA-256 checked)", True))
        except (BenchError, OSError) as e:
            out.append(Check("weights", spec.label, str(e).splitlines()[0], False))
    return out


def plan_checks(preset: str = "paper", memory: str | None = None) -> list[Check]:
    """The memory plan of ``preset`` for the first GPU's memory (or ``memory``, or the default)."""
    if memory is None and torch.cuda.is_available():
        size, source = torch.cuda.get_device_properties(0).total_memory, "GPU 0"
    else:
        size = parse_memory(memory or DEFAULT_MEMORY)
        source = "--gpu-memory" if memory else f"{NO_CUDA} here: the paper's RTX 4090"
    plans = plan(",".join(PLANNED), preset, memory=size)
    out = [Check("plan", f"--preset {preset}", f"{size_text(size)} ({source})", None)]
    for p in plans:
        s = p.chosen.setting if p.chosen else None
        how = (f"micro-batch {s.micro_batch} x {s.accumulation}, checkpointing {'on' if s.checkpointing else 'off'}, "
               f"peak {size_text(p.chosen.peak)}" if s else "does not fit even at micro-batch 1 with checkpointing")
        out.append(Check("plan", p.model, f"batch {p.batch_size} {p.precision}: {how} (without a plan "
                         f"{size_text(p.baseline.peak)})", p.fits(p.chosen)))
    out.append(Check("plan", "table", table(plans).rstrip(), None))
    return out


def checks(preset: str | None = "paper", memory: str | None = None) -> list[Check]:
    """Every check; the plan's only when ``preset`` is given."""
    out = torch_checks() + kernel_checks() + weight_checks()
    if preset:
        out += plan_checks(preset, memory)
    return out


def report(found: list[Check]) -> str:
    """The checks as text, by section, and a closing list of what is missing."""
    lines = ["bench doctor: what a GPU run will use here, and what is missing", ""]
    width = max(len(c.name) for c in found) + 2
    section = None
    for c in found:
        if c.section != section:
            section = c.section
            lines.append(section)
        if c.name == "table":
            lines.extend("    " + line for line in c.value.splitlines())
            continue
        mark = {True: "ok", False: "MISSING", None: ""}[c.ok]
        lines.append(f"  {c.name:<{width}}{mark:<9}{c.value}")
    missing = [c.name for c in found if c.ok is False]
    lines += ["", f"missing for a GPU run: {', '.join(missing)} (see above)" if missing
              else "nothing is missing for a GPU run."]
    return "\n".join(lines) + "\n"
