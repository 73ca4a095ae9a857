"""One timing process of ``bench speed``: every model warmed up, then timed in interleaved rounds.

A round times one call of every item (each model at each resolution and batch size, as one network evaluation
"nfe", one classifier-free-guided evaluation "guided" and one decode "decode") in an order shuffled per round from
(seed, process, round, attempt), so that a drift of the machine during the process reaches every model alike and
two models' per-round times can be compared pairwise. Before each round a calibration matmul is timed, and after it
the CPU use of other processes over the last second is read (``bench.quiet``): a busy round is thrown away, and after
waiting (bounded) for quiet it is timed again; with ``allow_busy`` it is kept and flagged. Whole images alternate the
same way, after the rounds.

The first process of a sweep also probes the kernels that ran, the peak memory of one evaluation, and where the
time of one evaluation goes (``bench.breakdown``), after its rounds so as not to disturb them; it decides which
items are cheap enough to time as whole images, and later processes follow that decision.

``Job`` is JSON-serialisable: ``bench.speed`` runs a job here, or in a fresh worker process
(``python -m bench.speed_worker``), and gets back a plain dict (see ``time_process``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from bench import sample as sampler  # a module: tests replace its sample_batch
from bench.breakdown import op_breakdown
from bench.errors import BenchError
from bench.flops import example_inputs
from bench.flow import guided_velocity
from bench.quiet import LoadMonitor, Quietness, calibrate, wait_for_quiet
from bench.runtime import PRECISIONS, autocast, cast_for_inference, tf32
from bench.timed_models import eval_model, load_decoder
from bench.timing import free_memory, is_out_of_memory, no_recompiles, peak_memory, probe_kernels, time_calls

GUIDED_SCALE = 1.5  # the guidance scale of the guided timing (any s != 1 costs the same doubled call)
KINDS = ("nfe", "guided", "decode")  # what a round times of each item
ERROR_CHARS = 200  # an error message is cut to this length in its CSV cell
MAX_ATTEMPTS_PER_ROUND = 20  # a round thrown away this often in a row stops the process (busy all along)


@dataclass
class Job:
    """What one timing process does; plain values only, so that it can travel to a worker process as JSON."""

    settings: list[dict]  # name, resolution, overrides, space, precision (bench.speed.Setting)
    preset: str
    steps: int
    batch_sizes: list[int]
    warmup: int
    rounds: int
    image_rounds: int
    processes: int
    full_image_max_seconds: float
    device: str
    threads: int
    seed: int = 0
    compile: bool = False
    tf32: bool = False
    vae: str | None = None
    allow_busy: bool = False
    quiet_wait: float = 60.0
    process: int = 0
    best_gflops: float = 0.0
    images: list[list[int]] | None = None  # [setting, batch] timed as whole images; None: this process decides
    probe: bool = True  # probe the kernels that ran and the peak memory (the sweep's first process)
    breakdown: bool = True  # profile where one evaluation's time goes (the first process, unless turned off)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Item:
    """One model at one resolution and batch size, ready to be called."""

    setting: int
    batch_size: int
    status: str = "ok"
    error: str = ""
    extra: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)  # kind -> zero-argument callable
    image: object = None  # zero-argument callable: one whole batch of images


def time_process(job: Job) -> dict:
    """Run ``job`` here; returns {"items": [...], "rounds": [...], "best_gflops", "images", "discarded"}."""
    device = torch.device(job.device)
    torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)
    dtype = PRECISIONS[job.settings[0]["precision"]] if job.settings else torch.float32
    quiet = Quietness(job.threads, job.best_gflops)
    decoders = {space: load_decoder(space, job.vae, device)
                for space in dict.fromkeys(s["space"] for s in job.settings)}
    with tf32(job.tf32) if device.type == "cuda" else contextlib.nullcontext(), torch.no_grad():
        items = prepare(job, device, decoders)
        ready = [it for it in items if it.status == "ok"]
        total = job.rounds * len(ready) * len(KINDS)
        with tqdm(total=total, desc=f"timing process {job.process + 1}/{job.processes}", unit="call",
                  leave=False, disable=None) as bar:
            rounds, discarded = run_rounds(job, ready, KINDS, job.rounds, quiet, device, dtype, bar)
        images = job.images if job.images is not None else choose_images(job, ready, rounds)
        chosen = [it for it in ready if [it.setting, it.batch_size] in images]
        for it in chosen:  # the sampler's own first-call costs stay out of the timed images
            _guarded(it, it.image, device)
        chosen = [it for it in chosen if it.status == "ok"]
        image_rounds, image_discarded = run_rounds(job, chosen, ("image",), job.image_rounds, quiet, device, dtype)
        if job.breakdown:
            for it in ready:
                profile_item(job, it, device)
    return {"items": [{"setting": it.setting, "batch_size": it.batch_size, "status": it.status, "error": it.error,
                       "extra": it.extra} for it in items],
            "rounds": rounds + image_rounds, "best_gflops": quiet.best_gflops, "images": images,
            "discarded": discarded + image_discarded}


def prepare(job: Job, device: torch.device, decoders: dict) -> list[Item]:
    """Every model built (seeded), cast, probed and warmed up at every batch size; an OOM makes an 'oom' item."""
    items = []
    for index, s in enumerate(job.settings):
        dtype = PRECISIONS[s["precision"]]
        space = decoders[s["space"]][0]
        try:
            torch.manual_seed(job.seed)
            model = cast_for_inference(eval_model(s["name"], job.preset, s["overrides"], device), s["precision"])
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            items += [_failed(Item(index, b), e, device) for b in job.batch_sizes]
            continue
        net = torch.compile(model) if job.compile else model
        for batch_size in job.batch_sizes:
            it = Item(index, batch_size, extra={"decoder": decoders[s["space"]][1]})
            gen = torch.Generator().manual_seed(job.seed)
            x, t, mask = example_inputs(model, batch_size, device, generator=gen)
            xd, maskd = x.to(dtype), mask.to(dtype)  # as the sampler feeds the model: t stays fp32
            noise = torch.randn(x.shape, generator=gen)
            guided = guided_velocity(lambda xs, ts, ms, net=net, dtype=dtype: net(xs.to(dtype), ts, ms), maskd,
                                     GUIDED_SCALE)

            def under(fn, precision=s["precision"]):
                """fn under the model's autocast, as the sampler calls it."""
                def call():
                    with autocast(device, precision):
                        return fn()
                return call

            it.calls = {"nfe": under(lambda net=net, xd=xd, t=t, m=maskd: net(xd, t, m)),
                        "guided": under(lambda g=guided, x=x, t=t: g(x, t)),
                        "decode": lambda space=space, x=x: space.decode(x.float())}
            it.image = lambda net=net, space=space, mask=mask, noise=noise, p=s["precision"]: sampler.sample_batch(
                net, space, mask, noise, job.steps, "euler", 1.0, p)
            try:
                warm_up(job, it, model, (xd, t, maskd), device, s["precision"])
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                _failed(it, e, device)
            items.append(it)
    return items


def warm_up(job: Job, it: Item, model: torch.nn.Module, inputs: tuple, device: torch.device, precision: str) -> None:
    """The first process's probes (kernels that ran, peak memory of one evaluation), then ``warmup`` untimed calls
    of every kind (compilation included, at the timed shapes and grad mode)."""
    if job.probe:
        with autocast(device, precision):
            it.extra.update(probe_kernels(model, *inputs))
            it.extra.update(peak_memory(lambda: model(*inputs), device))
    for _ in range(job.warmup):
        for call in it.calls.values():
            call()


def _failed(it: Item, e: BaseException, device: torch.device) -> Item:
    message = str(e).strip().splitlines()[0][:ERROR_CHARS] if str(e).strip() else "out of memory"
    it.status, it.error, it.calls, it.image = "oom", message, {}, None
    free_memory(device)
    return it


def _guarded(it: Item, fn, device: torch.device) -> float | None:
    """Seconds of one call of fn, or None when it ran out of memory (the item becomes 'oom')."""
    try:
        return time_calls(fn, 0, 1, device)[0]
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        _failed(it, e, device)
        return None


def run_rounds(job: Job, items: list[Item], kinds: tuple, count: int, quiet: Quietness, device: torch.device,
               dtype: torch.dtype, bar=None) -> tuple[list[dict], int]:
    """``count`` rounds over ``items`` x ``kinds`` in shuffled orders; (round records, rounds thrown away)."""
    monitor, records, discarded, attempt = LoadMonitor(), [], 0, 0
    done = 0
    while done < count and items:
        gflops = calibrate(device, dtype)
        order = [(it, kind) for it in items for kind in kinds]
        rng = np.random.default_rng([job.seed, job.process, done, attempt, len(kinds)])
        measured = []
        with no_recompiles(job.compile):
            for position in rng.permutation(len(order)):
                it, kind = order[position]
                if it.status != "ok":
                    continue
                seconds = _guarded(it, it.image if kind == "image" else it.calls[kind], device)
                measured.append((it, kind, seconds))
                if bar is not None:
                    bar.update()
        other = monitor.other_cpus()
        monitor.mark()
        # a calibration before and one after the round, the faster counts: one slow matmul is a hiccup, not a load
        reason = quiet.verdict(other, max(gflops, calibrate(device, dtype)))
        items = [it for it in items if it.status == "ok"]
        if reason and not job.allow_busy:
            discarded += 1
            attempt += 1
            if attempt >= MAX_ATTEMPTS_PER_ROUND:
                raise BenchError(f"the machine stayed busy: {reason}; time on a quiet machine, or pass --allow-busy "
                                 "(the rows are flagged busy and left out of the report's ratios)")
            still = wait_for_quiet(quiet, device, dtype, job.quiet_wait, echo=lambda *_: None)
            if still:
                raise BenchError(f"the machine became busy while timing and stayed so for {job.quiet_wait:.0f} s: "
                                 f"{still}; time again on a quiet machine, or pass --allow-busy (the rows are "
                                 "flagged busy and left out of the report's ratios)")
            monitor = LoadMonitor()
            continue
        for position, (it, kind, seconds) in enumerate(measured):
            if seconds is not None and it.status == "ok":
                records.append({"process": job.process, "round": done, "position": position,
                                "setting": it.setting, "batch_size": it.batch_size, "kind": kind,
                                "seconds": seconds, "busy": reason, "other_cpus": other, "calibration_gflops": gflops})
        done += 1
        attempt = 0
    return records, discarded


def choose_images(job: Job, items: list[Item], records: list[dict]) -> list[list[int]]:
    """Items whose whole images (an untimed one and image_rounds timed ones in every process) fit the budget."""
    chosen = []
    for it in items:
        nfe = [r["seconds"] for r in records if (r["setting"], r["batch_size"], r["kind"]) ==
               (it.setting, it.batch_size, "nfe")]
        decode = [r["seconds"] for r in records if (r["setting"], r["batch_size"], r["kind"]) ==
                  (it.setting, it.batch_size, "decode")]
        if not nfe or not decode:
            continue
        projected = statistics.median(nfe) * job.steps + statistics.median(decode)
        if projected * job.processes * (job.image_rounds + 1) <= job.full_image_max_seconds:
            chosen.append([it.setting, it.batch_size])
    return chosen


def profile_item(job: Job, it: Item, device: torch.device) -> None:
    """Where one evaluation's time goes (smallest batch only): the breakdown's columns into the item's extras."""
    if it.batch_size != min(job.batch_sizes) or it.status != "ok":
        return
    it.extra.update(op_breakdown(it.calls["nfe"], device).columns())


def image_rounds_per_process(image_repeats: int, processes: int) -> int:
    """Timed whole images per process so that the sweep times at least ``image_repeats`` of each."""
    return max(1, math.ceil(image_repeats / processes))
