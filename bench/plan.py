"""`bench plan`: the peak GPU memory of training and sampling, predicted without a GPU, and the settings that fit.

A training step is simulated on fake CUDA tensors (``bench.memsim``): the real model, built at the preset with its
real parameters' shapes, runs the trainer's own loss (``bench.flow.flow_loss``) under the trainer's autocast, then
backward, and every tensor is followed from allocation to release. Around that step sit the tensors that live for the
whole run, counted from the parameters (each tensor its own allocation, rounded as the CUDA allocator does):

- weights: fp32 parameters and buffers; EMA: a second copy; AdamW: two fp32 moments per trainable parameter;
- gradients: fp32, one per trainable parameter (allocated during backward; with accumulation they exist before
  every micro-batch but the first, which is the case simulated);
- with DDP (``processes`` > 1) one more gradient-sized copy, the reducer's buckets;
- in latent space the SD-VAE (its architecture, fp32) and the encoding of each micro-batch (no grad, fp32).

The peak of training is the largest of: the micro-batch step (encode, forward, backward); the optimiser step (static
plus gradients: the trainer's AdamW is fused on CUDA and updates in place, while the multi-tensor implementation it
uses on the CPU adds one fp32 temporary the size of the parameters, the square root of the second moment); and the
trainer's sample grid (static plus one guided
sampling step of ``grid_masks`` x 2 samples and its decoding). Sampling (``bench sample``) is one Euler step of the
EMA model at the batch, under no_grad, then decoding; the model is cast to the precision first, as the sampler does
(``bench.runtime.cast_for_inference``: bf16 weights, the scan's few fp32 parameters kept), while the trainer's grid
samples its fp32 EMA under autocast.

The plan keeps the recipe's global batch and picks the cheapest setting whose peak fits ``memory`` less a margin
(10% by default: the CUDA context, allocator fragmentation and kernel workspaces are not tensors). Settings are
micro-batches that divide each process's batch, with activation checkpointing off or on, ranked by an estimated
relative step time: checkpointing recomputes the forward (x 4/3: forward 1, backward 2, plus the recomputation 1)
and each extra accumulation step costs ``ACCUMULATION_OVERHEAD`` (smaller kernels, fewer samples per launch).
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass, field

import torch

from bench import flow, memsim, presets, recompute
from bench.autoencoder import LatentSpace, PixelSpace
from bench.errors import BenchError
from bench.memsim import cuda_autocast, round_allocation
from bench.runtime import PRECISIONS, autocast, cast_for_inference, check_precision, model_precision
from bench.sample import GRID_SAMPLES_PER_MASK
from bench.speed import RANDOM_VAE_LABEL, sd_vae_architecture
from bench.variants import Variant, build_model, parse_models, parse_variant

GiB = 2 ** 30
DEFAULT_MEMORY = "24GiB"  # the paper's RTX 4090
DEFAULT_MARGIN = 0.10
CHECKPOINT_COST = 4 / 3  # forward 1 + backward 2, plus one more forward
ACCUMULATION_OVERHEAD = 0.10  # relative cost of each extra micro-batch step (estimate)
UNITS = {"": GiB, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "kib": 2 ** 10, "m": 2 ** 20, "mb": 10 ** 6, "mib": 2 ** 20,
         "g": GiB, "gb": 10 ** 9, "gib": GiB, "t": 2 ** 40, "tb": 10 ** 12, "tib": 2 ** 40}


def parse_memory(text: str | int | float) -> int:
    """'24GiB', '24 GB', '80G', '81920MiB', or a number of GiB -> bytes; one-line error otherwise."""
    if isinstance(text, (int, float)):
        return int(text * GiB)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in UNITS or float(match.group(1)) <= 0:
        raise BenchError(f"--gpu-memory {text!r}: give a size such as 24GiB, 80GB or 16384MiB (GiB without a unit)")
    return int(float(match.group(1)) * UNITS[unit])


def size_text(nbytes: int | float | None) -> str:
    """Bytes as GiB (MiB below 1 GiB), one decimal."""
    if nbytes is None:
        return "-"
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB else f"{nbytes / 2 ** 20:.1f} MiB"


@dataclass(frozen=True)
class Setting:
    """How one process runs its share of the batch."""

    micro_batch: int
    accumulation: int
    checkpointing: bool

    @property
    def cost(self) -> float:
        """Estimated step time relative to the whole share at once without checkpointing."""
        return (CHECKPOINT_COST if self.checkpointing else 1.0) * (1 + ACCUMULATION_OVERHEAD * (self.accumulation - 1))


@dataclass
class TrainingMemory:
    """Predicted bytes of one training setting: what lives all run, and the peak of each phase."""

    setting: Setting
    weights: int
    ema: int
    optimizer: int
    gradients: int
    vae: int
    ddp: int
    activations: int  # saved for backward at the end of the micro-batch's forward (unique storages)
    step: int  # peak of encode + forward + backward, including the static bytes
    optimizer_step: int
    grid: int
    live_peak: int = 0  # the most bytes of tensors allocated during the step alive at once (static excluded)
    grid_transient: int = 0  # the sample grid's bytes above the static ones

    @property
    def static(self) -> int:
        return self.weights + self.ema + self.optimizer + self.vae + self.ddp

    @property
    def peak(self) -> int:
        return max(self.step, self.optimizer_step, self.grid)


@dataclass
class ModelPlan:
    """The plan of one backbone or variant."""

    model: str
    preset: str
    precision: str
    batch_size: int
    processes: int
    memory: int
    margin: float
    params: int
    space: str
    baseline: TrainingMemory
    chosen: TrainingMemory | None
    sampling: int
    tried: list[TrainingMemory] = field(default_factory=list)

    @property
    def budget(self) -> int:
        return int(self.memory * (1 - self.margin))

    def fits(self, estimate: TrainingMemory | None) -> bool:
        return estimate is not None and estimate.peak <= self.budget

    def record(self) -> dict:
        """What a run config keeps of the plan (``TrainConfig.memory_plan``)."""
        chosen = self.chosen
        return {"gpu_memory_gib": round(self.memory / GiB, 3), "margin": self.margin,
                "micro_batch": chosen.setting.micro_batch if chosen else None,
                "accumulation": chosen.setting.accumulation if chosen else None,
                "checkpointing": chosen.setting.checkpointing if chosen else None,
                "predicted_peak_gib": round(chosen.peak / GiB, 3) if chosen else None,
                "predicted_peak_without_plan_gib": round(self.baseline.peak / GiB, 3),
                "fits": self.fits(chosen)}


# ---------------------------------------------------------------------------------------------- simulation

def _space(model, device: str):
    """The model's space on ``device``: pixels, or the SD-VAE architecture (its weights do not change memory)."""
    if model.space != "latent":
        return PixelSpace()

    with torch.device(device):
        return LatentSpace(sd_vae_architecture(), RANDOM_VAE_LABEL)


def _bytes(tensors) -> int:
    return sum(round_allocation(t.numel() * t.element_size()) for t in tensors)


def _autocast(device: str, precision: str, fake: bool):
    """The trainer's autocast: ``torch.autocast`` on a real device, its equivalent for fake CUDA tensors."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if fake and torch.device(device).type == "cuda":
        return cuda_autocast(PRECISIONS[precision])
    return autocast(device, precision)


def _enable_checkpointing(model, device: str, precision: str, fake: bool) -> None:
    if not fake:
        recompute.enable(model)
        return
    # Fake CUDA: no CUDA RNG state to save, and torch.autocast("cuda") would switch itself off in the recomputation.
    options = {"preserve_rng_state": False}
    if torch.device(device).type == "cuda" and precision != "fp32":
        options["context_fn"] = lambda: (contextlib.nullcontext(), _autocast(device, precision, fake))
    recompute.enable(model, **options)


def training_memory(model: str, preset: str, batch_size: int, setting: Setting, precision: str,
                    overrides: dict | None = None, processes: int = 1, grid_batch: int = 0, device: str = "cuda",
                    fake: bool = True, grid_transient: int | None = None) -> TrainingMemory:
    """Simulate one training step of ``setting`` (see the module docstring); ``fake=False`` runs the same step on
    real tensors on ``device`` (the CPU check) with the autograd engine. ``grid_transient``: the sample grid's
    bytes when already known (they do not depend on the setting)."""
    share = batch_size // processes
    with memsim.fake_device(device) if fake else contextlib.nullcontext():
        net = build_model(model, preset, overrides, device).train()
        if setting.checkpointing:
            _enable_checkpointing(net, device, precision, fake)
        space = _space(net, device)
        params = [p for p in net.parameters() if p.requires_grad]
        weights = _bytes(list(net.parameters()) + list(net.buffers()))
        gradients = _bytes(params)
        static = dict(weights=weights, ema=weights, optimizer=2 * gradients, gradients=gradients,
                      vae=_bytes(list(space.parameters()) + list(space.buffers())),
                      ddp=gradients if processes > 1 else 0)
        c, h, w = net.input_shape
        k, s = net.num_classes, net.image_size
        live = memsim.LiveTensors(device=torch.device(device).type)
        saved = memsim.SavedTensors(exclude=list(net.parameters()))
        with live:
            images = torch.randn(share, 3, s, s, device=device)
            masks = torch.zeros(share, k, s, s, device=device)
            t, x0, drop = torch.rand(share), torch.randn(share, c, h, w), torch.zeros(share, dtype=torch.bool)
            data = live.live
            if setting.accumulation > 1:  # the later micro-batches: gradients of the earlier ones already there
                for p in params:
                    p.grad = torch.zeros_like(p)
            part = slice(0, setting.micro_batch)
            x1 = space.encode(images[part])
            with _autocast(device, precision, fake), saved:
                loss = flow.flow_loss(net, x1, flow.drop_masks(masks[part], drop[part].to(device)),
                                      t[part].to(device), x0[part].to(device))
            del x1
            if setting.accumulation > 1:
                loss = loss / setting.accumulation
            if precision == "fp16":  # the grad scaler's multiplication
                loss = loss * torch.full((), 2.0 ** 16, device=device)
            if fake:
                holder = [loss]
                del loss
                memsim.backward(holder)
            else:
                loss.backward()
                del loss
            step = live.peak
            for p in params:
                p.grad = None
        static_bytes = sum(v for k_, v in static.items() if k_ != "gradients")
        # optimiser step: the gradients and the batch, plus on the CPU the multi-tensor AdamW's fp32 temporary (the
        # square root of the second moment); fused on CUDA, it allocates nothing of that size
        temporary = 0 if torch.device(device).type == "cuda" else gradients
        optimizer_step = static_bytes + gradients + temporary + data
        if grid_transient is None:
            grid_transient = sampling_transient(net, space, grid_batch, precision, device, fake) if grid_batch else 0
        return TrainingMemory(setting=setting, activations=saved.bytes, step=static_bytes + step,
                              optimizer_step=optimizer_step, grid=static_bytes + grid_transient, live_peak=step,
                              grid_transient=grid_transient, **static)


def sampling_transient(net, space, batch_size: int, precision: str, device: str, fake: bool = True) -> int:
    """Peak bytes above the weights of one Euler step of ``net`` at ``batch_size`` and the decoding (no grad)."""
    c, h, w = net.input_shape
    k, s = net.num_classes, net.image_size
    was_training, trainable = net.training, [p for p in net.parameters() if p.requires_grad]
    net.eval().requires_grad_(False)  # as the EMA model samples: autocast then keeps no cached weight casts
    dtype = PRECISIONS[model_precision(net)]  # a model cast for inference gets its inputs in its dtype
    live = memsim.LiveTensors(device=torch.device(device).type)
    with live, torch.no_grad():
        masks = torch.zeros(batch_size, k, s, s, device=device, dtype=dtype)
        x = torch.randn(batch_size, c, h, w, device=device)
        with _autocast(device, precision, fake):
            v = net(x.to(dtype), torch.full((batch_size,), 0.5, device=device), masks)
            x = x + 0.01 * v.to(x.dtype)
            del v
        images = space.decode(x.float())
        del images
    net.train(was_training)
    for p in trainable:
        p.requires_grad_(True)
    return live.peak


def sampling_memory(model: str, preset: str, batch_size: int, precision: str, overrides: dict | None = None,
                    device: str = "cuda") -> int:
    """Predicted peak bytes of ``bench sample`` at ``batch_size``: EMA weights (cast to the precision), decoder, one
    Euler step, decoding."""
    with memsim.fake_device(device):
        net = cast_for_inference(build_model(model, preset, overrides, device).eval().requires_grad_(False), precision)
        space = _space(net, device)
        weights = _bytes(list(net.parameters()) + list(net.buffers()) + list(space.parameters())
                         + list(space.buffers()))
        return weights + sampling_transient(net, space, batch_size, precision, device)


# ---------------------------------------------------------------------------------------------- planning

def settings(share: int) -> list[Setting]:
    """Every micro-batch dividing ``share``, checkpointing off and on, cheapest first (larger micro-batch on ties)."""
    options = [Setting(m, share // m, ckpt) for m in range(share, 0, -1) if share % m == 0 for ckpt in (False, True)]
    return sorted(options, key=lambda s: (round(s.cost, 9), -s.micro_batch))


def plan_model(model, preset: str = "paper", batch_size: int | None = None, precision: str | None = None,
               memory: int | str = DEFAULT_MEMORY, margin: float = DEFAULT_MARGIN, processes: int = 1,
               overrides: dict | None = None, device: str = "cuda", progress=None,
               micro_batch: int | None = None) -> ModelPlan:
    """Predict ``model``'s peaks at the recipe's (or the given) batch and precision and choose the cheapest
    setting that fits ``memory`` less ``margin``; ``chosen`` is None when not even micro-batch 1 with
    checkpointing fits. ``micro_batch`` (0: the whole share) restricts the choice to that micro-batch."""
    variant = model if isinstance(model, Variant) else parse_variant(str(model))
    recipe = presets.recipe(preset, variant.model)
    batch_size = batch_size or recipe.batch_size
    precision = precision or recipe.precision
    check_precision(precision)
    memory = parse_memory(memory) if isinstance(memory, str) else int(memory)
    if not 0 <= margin < 1:
        raise BenchError(f"--margin {margin}: a fraction in [0, 1) is needed")
    if processes < 1 or batch_size % processes:
        raise BenchError(f"--batch-size {batch_size} is not divisible by {processes} processes")
    overrides = {**variant.kwargs(), **(overrides or {})}
    meta = build_model(variant.model, preset, overrides, "meta")
    grid = presets.budget(preset).grid_masks * GRID_SAMPLES_PER_MASK
    share = batch_size // processes
    common = dict(model=variant.model, preset=preset, batch_size=batch_size, precision=precision, overrides=overrides,
                  processes=processes, grid_batch=grid, device=device)
    say = progress or (lambda text: None)
    plan = ModelPlan(model=variant.name, preset=preset, precision=precision, batch_size=batch_size,
                     processes=processes, memory=memory, margin=margin,
                     params=sum(p.numel() for p in meta.parameters()), space=meta.space, baseline=None, chosen=None,
                     sampling=0)
    candidates = settings(share)
    unplanned = candidates[0]  # the whole share at once, no checkpointing: the run without a plan

    def estimate(setting: Setting) -> TrainingMemory:
        say(f"{variant.name}: micro-batch {setting.micro_batch}, checkpointing "
            f"{'on' if setting.checkpointing else 'off'}")
        known = plan.baseline.grid_transient if plan.baseline else None
        result = training_memory(setting=setting, **common, grid_transient=known)
        plan.tried.append(result)
        return result

    plan.baseline = estimate(unplanned)
    if micro_batch is not None:
        candidates = [c for c in candidates if c.micro_batch == (micro_batch or share)]
    for setting in candidates:
        result = plan.baseline if setting == unplanned else estimate(setting)
        if plan.fits(result):
            plan.chosen = result
            break
    b = plan.baseline
    if grid == batch_size:  # the grid's sampling step is bench sample's at this batch: weights + decoder + it
        plan.sampling = b.weights + b.vae + b.grid_transient
    else:
        say(f"{variant.name}: sampling at batch {batch_size}")
        plan.sampling = sampling_memory(variant.model, preset, batch_size, precision, overrides, device)
    return plan


def plan(models, preset: str = "paper", batch_size: int | None = None, precision: str | None = None,
         memory: int | str = DEFAULT_MEMORY, margin: float = DEFAULT_MARGIN, processes: int = 1,
         progress=None) -> list[ModelPlan]:
    """``plan_model`` for each backbone or variant of ``models`` (a comma-separated string or a list)."""
    presets.budget(preset)
    return [plan_model(v, preset, batch_size, precision, memory, margin, processes, progress=progress)
            for v in parse_models(models)]


def apply(cfg, memory: int | str, margin: float = DEFAULT_MARGIN, processes: int = 1, resume: bool = False,
          progress=None) -> ModelPlan:
    """Set ``cfg.micro_batch`` and ``cfg.checkpointing`` (a TrainConfig) from the plan for ``memory`` and record the
    plan in ``cfg.memory_plan``; a one-line error when nothing fits. A resumed run keeps its micro-batch (it
    changes the trajectory; ``bench.train.RESUME_FREE``): only checkpointing is chosen then."""
    result = plan_model(cfg.variant or cfg.model, cfg.preset, cfg.batch_size, cfg.precision, memory, margin,
                        processes, overrides=cfg.model_overrides, progress=progress,
                        micro_batch=cfg.micro_batch if resume else None)
    if result.chosen is None:
        how = (f"at its micro-batch {cfg.micro_batch or cfg.batch_size // processes} with checkpointing (a resumed "
               f"run keeps its micro-batch)" if resume else "even at micro-batch 1 with checkpointing")
        raise BenchError(f"{result.model} at batch {cfg.batch_size} ({cfg.precision}) does not fit "
                         f"{size_text(result.memory)} less {result.margin:.0%} {how} (predicted "
                         f"{size_text(result.tried[-1].peak)}); use a GPU with more memory or a smaller batch")
    setting = result.chosen.setting
    cfg.micro_batch = setting.micro_batch if setting.accumulation > 1 else 0
    cfg.checkpointing = setting.checkpointing
    cfg.memory_plan = result.record()
    return result


# ---------------------------------------------------------------------------------------------- output

def _row(label: str, plan: ModelPlan, estimate: TrainingMemory | None) -> dict:
    if estimate is None:
        return {"": label, "micro-batch": "-", "accumulation": "-", "checkpointing": "-", "peak": "-",
                "fits": "no: nothing fits"}
    s = estimate.setting
    return {"": label, "micro-batch": s.micro_batch, "accumulation": s.accumulation,
            "checkpointing": "on" if s.checkpointing else "off", "peak": size_text(estimate.peak),
            "fits": "yes" if plan.fits(estimate) else "no"}


def describe(plan: ModelPlan) -> str:
    """One line: the plan's choice for a run."""
    s = plan.chosen.setting
    return (f"memory plan for {size_text(plan.memory)} (less {plan.margin:.0%}): micro-batch {s.micro_batch} x "
            f"{s.accumulation} accumulation step{'s' if s.accumulation > 1 else ''}, checkpointing "
            f"{'on' if s.checkpointing else 'off'}; predicted peak {size_text(plan.chosen.peak)} "
            f"({size_text(plan.baseline.peak)} without a plan)")


def breakdown(estimate: TrainingMemory) -> str:
    """One line: what the peak is made of."""
    parts = [("weights", estimate.weights), ("EMA", estimate.ema), ("AdamW", estimate.optimizer),
             ("gradients", estimate.gradients), ("VAE", estimate.vae), ("DDP buckets", estimate.ddp)]
    text = ", ".join(f"{name} {size_text(v)}" for name, v in parts if v)
    phase = max(("step", estimate.step), ("optimiser step", estimate.optimizer_step), ("sample grid", estimate.grid),
                key=lambda kv: kv[1])[0]
    return (f"{text}; saved activations {size_text(estimate.activations)} per micro-batch; peak in the {phase} "
            f"(step {size_text(estimate.step)}, optimiser step {size_text(estimate.optimizer_step)}, sample grid "
            f"{size_text(estimate.grid)})")


def table(plans: list[ModelPlan]) -> str:
    """The plans as text: a header, then per model its table (without and with the plan) and what the peaks are."""
    import pandas as pd

    if not plans:
        return ""
    p0 = plans[0]
    lines = [f"bench plan: preset {p0.preset}, global batch {p0.batch_size}, {p0.precision}, {p0.processes} "
             f"process{'es' if p0.processes > 1 else ''}, GPU memory {size_text(p0.memory)}: fits when the predicted "
             f"peak is at most {size_text(p0.budget)} (a {p0.margin:.0%} margin). Peaks are allocated tensor memory "
             f"(torch.cuda.max_memory_allocated), predicted on fake CUDA tensors; SISMA and DiM with mamba-ssm's "
             f"and causal-conv1d's kernels (Self-Mamba through the fused mamba_inner_fn), attention with "
             f"flash/memory-efficient SDPA; AdamW fused.", ""]
    for p in plans:
        lines.append(f"{p.model} ({p.params / 1e6:.1f}M parameters, {p.space} space): sampling at batch "
                     f"{p.batch_size} peaks at {size_text(p.sampling)}")
        df = pd.DataFrame([_row("without a plan", p, p.baseline), _row("with the plan", p, p.chosen)])
        lines.append(df.to_markdown(index=False))
        lines.append(f"with the plan: {breakdown(p.chosen or p.tried[-1])}")
        tried = "; ".join(f"{e.setting.micro_batch} x {e.setting.accumulation}, "
                          f"{'on' if e.setting.checkpointing else 'off'}: {size_text(e.peak)}" for e in p.tried)
        lines.append(f"settings simulated, cheapest first (micro-batch x accumulation, checkpointing: peak): {tried}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def summary(plans: list[ModelPlan]) -> list[dict]:
    """Plain data of the plans (for tests and scripts)."""
    return [{"model": p.model, "without_plan": p.baseline.peak, "with_plan": p.chosen.peak if p.chosen else None,
             "fits": p.fits(p.chosen), "setting": dataclasses.asdict(p.chosen.setting) if p.chosen else None,
             "sampling": p.sampling} for p in plans]

