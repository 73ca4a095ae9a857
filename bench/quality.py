"""``bench quality``: sample trained runs on test masks and score the images; one row per run in results/quality.csv.

Protocol (where it sits in the chain: docs/design.md, "Data flow"):

- Masks: the first ``--n-masks`` label maps of the test split (all by default), at the run's image size. Each mask
  gets ``--samples-per-mask`` samples (10); the noise of sample j of mask i depends only on (seed, i, j).
- ``fid``, ``kid``, ``kid_std``: torch-fidelity's Inception (inception-v3-compat), the real test images of those
  masks against one generated image per mask (sample 0), both at the run's image size (the extractor resizes to
  299 px itself). KID uses subsets of min(1000, n) images.
- ``lpips_diversity``: per mask, LPIPS (AlexNet, v0.1) averaged over the 45 pairs of its 10 samples, then averaged
  over masks. Images below 64 px are upsampled bilinearly first (``lpips_size`` records the size used).
- ``pixel_diversity``: the same pairwise average of the mean absolute pixel difference (images in [0, 1]); it needs
  no weights and is no substitute for LPIPS.
- ``miou``: the face parser (``bench parser train``) on every generated image against the mask it was generated
  from; ``miou_ceiling``: the same parser on the real test images of those masks.
- Sampling runs at each run's training precision (bf16 at the ``paper`` preset) unless ``--precision`` says otherwise:
  the EMA model is cast to it once (``bench.sample``); the precision is part of the images' settings hash.

A metric whose weights cannot be found is written as NaN with ``<metric>_status`` = "missing: <reason>"; ``--require``
makes that an error instead. Generated images are PNGs in RUN/eval/<settings hash>/ (the hash covers the checkpoint,
data, split, resolution, sampler and seed, not the number of masks or samples), so a later call with the same
settings, or asking for fewer or more masks, reuses what exists and generates only what is missing.

Default runs: every folder holding a config.json under ``runs/`` (where ``bench train`` writes) and
``results/runs/``. Default parser: ``results/parser/parser-{size}px.pt``; when it does not exist it is trained there
first (a few minutes on CPU at 32 px) on the train split of the evaluated data set.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from bench import metrics
from bench import parser as face_parser
from bench import sample as sampler  # a module: tests replace its generate
from bench.checkpoint import load
from bench.data import NUM_CLASSES, FaceDataset, onehot
from bench.errors import BenchError
from bench.flow import METHODS, NFE_PER_STEP
from bench.io import ResultsFile, display_path, sha256_file, to_uint8, write_json, write_png
from bench.provenance import provenance
from bench.rows import MaskScoreRow, QualityRow
from bench.runtime import check_precision
from bench.synth import ensure_default_set

DEFAULT_OUT = Path("results/quality.csv")
RUN_ROOTS = (Path("runs"), Path("results/runs"))
SAMPLE_STRIDE = 1000  # sample j of mask i uses noise index i * SAMPLE_STRIDE + j, so j < SAMPLE_STRIDE
REQUIRABLE = ("fid", "kid", "lpips", "miou")
EVAL_DIRNAME = "eval"
PARSER_DIGEST_HEX = 16  # hex digits of the parser's SHA-256 kept in a quality row


@dataclass
class QualitySettings:
    """What decides the generated images (hashed into their folder) and how many are scored."""

    data: str
    split: str = "test"
    n_masks: int = 0            # 0: every mask of the split
    samples_per_mask: int = 10
    steps: int = 200
    method: str = "euler"
    guidance: float = 1.0
    seed: int = 0
    precision: Optional[str] = None  # None: each run's training precision (resolved before hashing)


def discover_runs(roots=RUN_ROOTS) -> list[Path]:
    """Run folders (holding config.json) directly under the default run roots."""
    runs = []
    for root in roots:
        if root.is_dir():
            runs += sorted(p for p in root.iterdir() if (p / "config.json").is_file())
    return runs


def run_data(run_config: dict, size: int) -> Path:
    """The data folder a run trained on; its default synthetic set is generated if absent (as the trainer does)."""
    if run_config.get("synthetic"):
        ensure_default_set(run_config["data"], run_config["synth_n"], size, progress=False)
    return Path(run_config["data"])


# --------------------------------------------------------------------------- generated images
def eval_key(checkpoint: Path, step: int, image_size: int, settings: QualitySettings) -> tuple[str, dict]:
    """The name of the eval folder (a hash of everything that decides the images) and what it hashes."""
    ckpt = Path(checkpoint)
    st = ckpt.stat()
    key = {
        "checkpoint": {"file": ckpt.name, "step": step, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns},
        "data": display_path(settings.data), "split": settings.split, "size": image_size,
        "steps": settings.steps, "method": settings.method, "guidance": settings.guidance, "seed": settings.seed,
        "precision": settings.precision,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16], key


def eval_dir(run, settings: QualitySettings, checkpoint: Path) -> Path:
    """RUN/eval/<hash of everything that decides the images>."""
    digest, key = eval_key(checkpoint, run.step, run.image_size, settings)
    folder = run.run_dir / EVAL_DIRNAME / digest
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "settings.json", key)
    return folder


def sample_file(folder: Path, mask: int, sample: int) -> Path:
    return folder / f"m{mask:05d}_s{sample:02d}.png"


def generated_images(run, labels: torch.Tensor, settings: QualitySettings, batch_size: int, checkpoint: Path,
                     progress: bool = True) -> tuple[torch.Tensor, int, Path]:
    """uint8 images (M, S_per, 3, S, S) for label maps (M, S, S): read from the run's eval folder, the missing
    ones generated (and written) first. Returns them, the NFE per image and the folder."""
    from PIL import Image
    from tqdm import tqdm

    folder = eval_dir(run, settings, checkpoint)
    per = settings.samples_per_mask
    todo = [(i, j) for i in range(len(labels)) for j in range(per) if not sample_file(folder, i, j).exists()]
    for start in tqdm(range(0, len(todo), batch_size), desc=f"sampling {run.run_dir.name}", unit="batch",
                      disable=not progress or not todo):
        chunk = todo[start:start + batch_size]
        masks = onehot(labels[[i for i, _ in chunk]])
        images, _ = sampler.generate(run, masks, [i * SAMPLE_STRIDE + j for i, j in chunk], settings.seed,
                                     settings.steps, settings.method, settings.guidance, batch_size, settings.precision)
        pix = to_uint8(images).permute(0, 2, 3, 1).numpy()  # (B, S, S, 3)
        for (i, j), p in zip(chunk, pix):
            write_png(sample_file(folder, i, j), p)
    S = run.image_size
    out = torch.empty(len(labels), per, 3, S, S, dtype=torch.uint8)
    for i in range(len(labels)):
        for j in range(per):
            with Image.open(sample_file(folder, i, j)) as im:
                out[i, j] = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    return out, settings.steps * NFE_PER_STEP[settings.method], folder


# --------------------------------------------------------------------------- metric resources
@dataclass
class Resources:
    """Weight files and parser found for this call; a missing one carries the reason instead."""

    inception: Optional[Path]
    inception_missing: str
    alexnet: Optional[Path]
    alexnet_missing: str


def find_resources(inception: Optional[Path], alexnet: Optional[Path], require: set[str]) -> Resources:
    """Resolve and hash-check the weight files; a missing one is an error only if a metric needing it is required."""
    found = {}
    for name, spec, explicit, needs in (("inception", metrics.INCEPTION_WEIGHTS, inception, {"fid", "kid"}),
                                        ("alexnet", metrics.ALEXNET_WEIGHTS, alexnet, {"lpips"})):
        try:
            found[name], found[name + "_missing"] = metrics.resolve_weights(spec, explicit), ""
        except metrics.WeightsMissing as e:
            if needs & require:
                raise BenchError(f"--require {','.join(sorted(needs & require))}: {e}") from None
            found[name], found[name + "_missing"] = None, f"missing: {e}"
    return Resources(**found)


def parse_require(value: str) -> set[str]:
    names = {v.strip() for v in value.split(",") if v.strip()}
    unknown = names - set(REQUIRABLE)
    if unknown:
        raise BenchError(f"--require {value}: unknown metric {sorted(unknown)[0]!r}; use a comma list of "
                         f"{', '.join(REQUIRABLE)}")
    return names


def get_parser(path: Optional[Path], size: int, data: Path, device: torch.device, progress: bool = True,
               echo=print):
    """The face parser: ``path``, or the default one for ``size``, trained there first if it does not exist."""
    if path is None:
        path = face_parser.default_parser_path(size)
        if not path.exists():
            echo(f"no face parser at {path}: training one on the train split of {data} "
                 f"(`bench parser train --data {data} --size {size}` does this ahead of time)")
            cfg, train = face_parser.ParserConfig.for_size(size), face_parser.ParserTrainConfig()
            model = face_parser.train_parser(data, cfg, train, device, progress)
            face_parser.save_parser(model, path, {"data": str(data), **asdict(train),
                                                  "test_miou": face_parser.evaluate(model, data, "test")})
    model, _ = face_parser.load_parser(path, device)
    if model.config.size != size:
        raise BenchError(f"face parser {path} works at {model.config.size} px but the run's images are {size} px; "
                         f"train one with: bench parser train --data {data} --size {size}")
    return model, path


def parser_digest(path: Path) -> str:
    """The parser file's identity in a quality row: its SHA-256, first 16 hex digits. A parser trained from the same
    seed on another CPU rounds differently, so its path alone does not say which parser scored a row."""
    return sha256_file(path)[:PARSER_DIGEST_HEX]


# --------------------------------------------------------------------------- one run
def evaluate_run(run_dir: Path, data: Optional[Path], resources: Resources, parser_path: Optional[Path],
                 device: torch.device, batch_size: int, progress: bool = True, echo=print,
                 checkpoint: Optional[Path] = None, **setting_overrides) -> tuple[dict, list[dict]]:
    """Generate (or reuse) the images of one run's checkpoint (default last.pt) and compute every metric.

    Returns the result row (QualityRow) and one MaskScoreRow per test mask (the per-mask counts behind mIoU and the
    diversities, from which confidence intervals are drawn). ``setting_overrides`` are QualitySettings fields
    other than ``data``."""
    checkpoint = Path(checkpoint) if checkpoint is not None else Path(run_dir) / "checkpoints" / "last.pt"
    # cast once, for every batch
    run = sampler.load_run(run_dir, device, checkpoint, setting_overrides.get("precision"))
    size = run.image_size
    data = Path(data) if data is not None else run_data(run.config, size)
    settings = QualitySettings(data=str(data), **{**setting_overrides, "precision": run.precision})
    model, used = get_parser(parser_path, size, data, device, progress, echo)  # before sampling: a wrong one fails fast
    real, labels = face_parser.load_split(data, settings.split, size,
                                          limit=settings.n_masks or None, progress=progress)
    n = len(real)
    fake, nfe, folder = generated_images(run, labels.long(), settings, batch_size, checkpoint, progress)
    name = run.config.get("variant") or run.config["model"]
    row = {"run": display_path(run_dir), "checkpoint": display_path(checkpoint), "model": name,
           "preset": run.config["preset"], "train_seed": run.config.get("seed"),
           "train_step": run.step, "train_steps": run.config.get("steps"), "image_size": size, "data": str(data),
           "split": settings.split, "n_masks": n, "samples_per_mask": settings.samples_per_mask,
           "method": settings.method, "guidance": settings.guidance, "eval_key": folder.name}

    # FID/KID: real test images against the first sample of each mask.
    row["fid_images"] = n
    if resources.inception is None or n < 2:
        status = resources.inception_missing or "missing: FID and KID need at least 2 masks"
        row.update(fid=math.nan, kid=math.nan, kid_std=math.nan, fid_status=status, kid_status=status)
    else:
        row.update(metrics.fid_kid(real, fake[:, 0], resources.inception, device, batch_size, seed=settings.seed),
                   fid_status="ok", kid_status="ok")

    # Diversity over the samples of each mask.
    groups01 = [f.float() / 255 for f in fake]
    pixel = [metrics.pairwise_mean(g, metrics.pixel_l1) for g in groups01]
    row["pixel_diversity"] = float(np.mean(pixel))
    row["lpips_size"] = max(size, metrics.LPIPS_MIN_SIZE)
    lpips = [math.nan] * n
    if resources.alexnet is None:
        row.update(lpips_diversity=math.nan, lpips_status=resources.alexnet_missing)
    else:
        distance = metrics.lpips_distance(metrics.load_lpips(resources.alexnet, device), device)
        lpips = [metrics.pairwise_mean(g * 2 - 1, distance, batch_size) for g in groups01]
        row.update(lpips_diversity=float(np.mean(lpips)), lpips_status="ok")

    # Mask adherence: the parser on every generated image vs its input mask, and on the real images (ceiling).
    per = settings.samples_per_mask
    flat = fake.flatten(0, 1)                                        # (M * S_per, 3, S, S)
    targets = labels.long().repeat_interleave(per, dim=0)
    conf = face_parser.per_image_confusion(model, flat, targets, batch_size).view(n, per, *2 * [NUM_CLASSES]).sum(1)
    real_conf = face_parser.per_image_confusion(model, real, labels.long(), batch_size)  # (M, K, K)
    row["miou"] = metrics.miou(conf.sum(0))
    row["miou_ceiling"] = metrics.miou(real_conf.sum(0))
    row["parser"] = str(used)
    row["parser_sha256"] = parser_digest(used)
    row["eval_dir"] = str(folder)
    row.update(provenance(device, settings.precision, batch_size, settings.steps, nfe, settings.seed))

    names = mask_sources(data, settings.split, n)
    masks = []
    for i in range(n):
        inter, union = metrics.inter_union(conf[i])
        c_inter, c_union = metrics.inter_union(real_conf[i])
        masks.append({"eval_key": folder.name, "model": name, "preset": row["preset"],
                      "train_seed": row["train_seed"], "train_step": run.step, "mask": i, "mask_source": names[i],
                      "samples": per, "pixel_diversity": pixel[i], "lpips_diversity": lpips[i],
                      "inter": counts_text(inter), "union": counts_text(union),
                      "ceiling_inter": counts_text(c_inter), "ceiling_union": counts_text(c_union)})
    return row, masks


def counts_text(counts: torch.Tensor) -> str:
    """Per-class counts as one CSV cell: space-separated integers."""
    return " ".join(str(int(c)) for c in counts)


def mask_sources(data: Path, split: str, n: int) -> list[str]:
    """Names of the first ``n`` faces of a split ("test-28000"), as the sample records name them."""
    ds = FaceDataset(data, split=split, size=32)
    return [f"{split}-{i}" for i in ds.indices[:n]]


# --------------------------------------------------------------------------- results file
MASKS_FILE = "quality_masks.csv"


def masks_path(quality_csv: Path) -> Path:
    """The per-mask scores file that goes with a quality CSV (same folder)."""
    return Path(quality_csv).with_name(MASKS_FILE)


def append_rows(path: Path, rows: list[dict], masks: list[dict] = ()) -> None:
    """Add quality rows to ``path`` and their per-mask scores to the quality_masks.csv beside it, under their locks;
    earlier rows stay as they are. The per-mask rows go first, so a quality row never lacks its masks."""
    if masks:
        ResultsFile(masks_path(path), MaskScoreRow).append(masks)
    ResultsFile(path, QualityRow).append(rows)


def masks_to_score(settings: QualitySettings, image_size: int) -> int:
    """How many masks a call with ``settings`` scores: ``n_masks`` of the split, or all of it."""
    available = len(FaceDataset(settings.data, split=settings.split, size=image_size))
    return min(settings.n_masks, available) if settings.n_masks else available


def scored_before(out: Path, checkpoint: Path, image_size: int, settings: QualitySettings, resources: Resources,
                  parser: Path) -> bool:
    """Whether ``out`` holds a row of the same images (eval key) scored on at least as many masks with as many
    samples each, by ``parser`` as it is now, with every metric that can be computed now: scoring again would add
    nothing."""
    key, _ = eval_key(checkpoint, int(load(checkpoint, mmap=True)["step"]), image_size, settings)
    rows = ResultsFile(out, QualityRow).read()
    rows = rows[(rows["eval_key"] == key) & (rows["samples_per_mask"] == settings.samples_per_mask)
                & (rows["n_masks"] >= masks_to_score(settings, image_size)) & (rows["parser"] == str(parser))]
    recorded = rows["parser_sha256"].notna() & (rows["parser_sha256"].astype(str) != "")
    rows = rows[~recorded | (rows["parser_sha256"].astype(str) == parser_digest(parser))]
    if resources.inception is not None:
        rows = rows[rows["fid_status"] == "ok"]
    if resources.alexnet is not None:
        rows = rows[rows["lpips_status"] == "ok"]
    # the parser file written after a row (retrained) scores differently; timestamps have whole seconds
    parser_written = math.floor(Path(parser).stat().st_mtime)
    return any(_seconds(stamp) >= parser_written for stamp in rows["timestamp"])


def _seconds(stamp) -> float:
    """A row's ISO timestamp as seconds since the epoch (-inf when it is not one)."""
    try:
        return datetime.datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return -math.inf


SUMMARY_COLUMNS = ["model", "preset", "n_masks", "fid", "kid", "lpips_diversity", "pixel_diversity", "miou",
                   "miou_ceiling"]


def check_settings(settings: QualitySettings) -> None:
    """One-line errors for sampling settings that cannot work, naming the option and its range."""
    if settings.precision is not None:
        check_precision(settings.precision)
    sampler.check_guidance(settings.guidance)
    if settings.method not in METHODS:
        raise BenchError(f"--method {settings.method}: use one of {', '.join(METHODS)}")
    if not 2 <= settings.samples_per_mask <= SAMPLE_STRIDE:
        raise BenchError(f"--samples-per-mask {settings.samples_per_mask}: use 2 to {SAMPLE_STRIDE} "
                         f"(diversity needs pairs)")
    if settings.n_masks < 0 or settings.steps < 1:
        raise BenchError(f"--n-masks must be >= 0 and --steps >= 1; got {settings.n_masks} and {settings.steps}")


def score_runs(runs: list[Path], data: Optional[Path], settings: dict, resources: Resources,
               parser: Optional[Path], device: torch.device, batch_size: int, out: Path, echo=print) -> list[dict]:
    """Score every run (``settings``: QualitySettings fields other than data); each row appended to ``out`` as soon
    as it is computed. Bad settings, a missing parser file or a results file that is not ours fail before any work."""
    check_settings(QualitySettings(data="", **settings))
    if batch_size < 1:
        raise BenchError(f"--batch-size must be at least 1, got {batch_size}")
    ResultsFile(out, QualityRow).check()
    ResultsFile(masks_path(out), MaskScoreRow).check()
    if parser is not None and not Path(parser).is_file():
        raise BenchError(f"no face parser at {parser}; train one with: bench parser train --data DIR --out {parser}")
    runs = runs or discover_runs()
    if not runs:
        raise BenchError("no runs found under runs/ or results/runs/; pass --runs RUN (train one with bench train)")
    rows = []
    for run_dir in runs:
        row, masks = evaluate_run(run_dir, data, resources, parser, device, batch_size, echo=echo, **settings)
        append_rows(out, [row], masks)
        rows.append(row)
    return rows
