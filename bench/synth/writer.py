"""Synthetic faces written to disk in the CelebAMask-HQ layout, with a manifest that marks a complete set."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.data import CACHE_DIRNAME, IMAGE_DIRNAME, MASK_DIRNAME, SYNTH_MANIFEST, image_path, mask_path
from bench.errors import BenchError
from bench.io import write_json
from bench.synth.geometry import Grid, draw_shapes, paint, part_masks, sample_geometry
from bench.synth.render import render_image, sample_appearance

GENERATOR_VERSION = 1  # bump whenever a face for a given (seed, index) changes: old sets get regenerated
MANIFEST_NAME = SYNTH_MANIFEST
JPEG_QUALITY = 95
PNG_COMPRESS_LEVEL = 1  # binary masks compress well even at the fastest level
MIN_SIZE = 16
# The default set of the trainer and `bench run`: the same faces for every run, whatever the training seed, drawn
# at twice the models' image size so that their masks (written at half the image size) come at the models' size.
DEFAULT_ROOT = Path("data")
DEFAULT_SEED = 0
DEFAULT_UPSCALE = 2
WAIT_TIMEOUT_S = 4 * 3600  # how long the other processes of a DDP job wait for rank 0's synthetic set
WAIT_POLL_S = 2.0

# ----------------------------------------------------------------------------------------------
# One face, the whole set
# ----------------------------------------------------------------------------------------------

@dataclass
class SynthFace:
    """One generated face: its image, its label map at mask resolution and its binary part masks."""

    image: np.ndarray              # (S, S, 3) uint8
    label: np.ndarray              # (S/2, S/2) uint8 class indices, what merging the parts gives
    parts: dict[str, np.ndarray]   # part name -> (S/2, S/2) bool


def _check_size(size: int) -> None:
    if size < MIN_SIZE or size % 2:
        raise BenchError(f"--size {size} is not usable: give an even image size >= {MIN_SIZE} "
                         f"(masks are written at half of it), e.g. 256")


def make_face(seed: int, index: int, size: int, appearance_seed: int | None = None) -> SynthFace:
    """Face ``index`` of the set with ``seed`` at ``size`` px; ``appearance_seed`` re-renders the same mask."""
    _check_size(size)
    g = sample_geometry(np.random.default_rng([seed, index, 0]))
    look_rng = np.random.default_rng([seed, index, 1] if appearance_seed is None else [appearance_seed, index, 2])
    appearance = sample_appearance(look_rng)
    mask_grid = Grid(g, size // 2)
    shapes = draw_shapes(g, mask_grid)
    label = paint(shapes)
    image = render_image(paint(draw_shapes(g, Grid(g, size))), g, appearance, look_rng)
    return SynthFace(image=image, label=label, parts=part_masks(shapes, label))


def write_face(root: Path, index: int, face: SynthFace) -> None:
    """Write one face's image and part masks into the CelebAMask-HQ layout under ``root``.

    Files are written in place, not through a temporary file each: the set's unit of atomicity is
    its manifest, marked complete only after the last face, so an interrupted set is never reused.
    """
    Image.fromarray(face.image).save(image_path(root, index), "JPEG", quality=JPEG_QUALITY)
    for part, mask in face.parts.items():
        Image.fromarray(mask.view(np.uint8) * np.uint8(255)).save(mask_path(root, index, part), "PNG",
                                                                 compress_level=PNG_COMPRESS_LEVEL)


def _generate_one(job: tuple[str, int, int, int]) -> int:
    root, index, size, seed = job
    write_face(Path(root), index, make_face(seed, index, size))
    return index


@dataclass
class Manifest:
    """What a synthetic set holds; ``complete`` turns true only after every face was written."""

    n: int
    size: int
    seed: int
    version: int = GENERATOR_VERSION
    generator: str = "sis-bench synthetic faces"
    complete: bool = False


def read_manifest(root: Path) -> Manifest | None:
    try:
        return Manifest(**json.loads((Path(root) / MANIFEST_NAME).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_manifest(root: Path, m: Manifest) -> None:
    write_json(root / MANIFEST_NAME, asdict(m))


def _prepare_folder(root: Path) -> None:
    """Empty the layout of an earlier synthetic set in ``root``; refuse to touch anyone else's files."""
    if root.exists() and not root.is_dir():
        raise BenchError(f"{root} is a file; give a folder for the synthetic set")
    ours = (root / MANIFEST_NAME).exists()
    if root.exists() and any(root.iterdir()) and not ours:
        raise BenchError(f"{root} is not empty and holds no {MANIFEST_NAME} (not a synthetic set); "
                         f"give an empty or new folder")
    for sub in (IMAGE_DIRNAME, MASK_DIRNAME, CACHE_DIRNAME):
        shutil.rmtree(root / sub, ignore_errors=True)


def default_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def generate_synthetic(out_dir: str | os.PathLike, n: int, size: int = 256, seed: int = 0,
                       workers: int | None = None, progress: bool = True) -> Path:
    """Write ``n`` synthetic faces at ``size`` px into ``out_dir`` in the CelebAMask-HQ layout."""
    from tqdm import tqdm

    if n < 1:
        raise BenchError(f"--n {n}: give at least one face")
    _check_size(size)
    root = Path(out_dir)
    _prepare_folder(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(n=n, size=size, seed=seed)
    _write_manifest(root, manifest)
    for sub in range((n - 1) // 2000 + 1):
        (root / MASK_DIRNAME / str(sub)).mkdir(parents=True, exist_ok=True)
    (root / IMAGE_DIRNAME).mkdir(parents=True, exist_ok=True)

    workers = default_workers() if workers is None else max(1, workers)
    jobs = [(str(root), i, size, seed) for i in range(n)]
    bar = tqdm(total=n, desc="synthetic faces", unit="face", disable=not progress)
    if workers == 1 or n < 4 * workers:
        for job in jobs:
            _generate_one(job)
            bar.update()
    else:
        import multiprocessing

        with multiprocessing.get_context().Pool(workers) as pool:
            for _ in pool.imap_unordered(_generate_one, jobs, chunksize=8):
                bar.update()
    bar.close()
    manifest.complete = True
    _write_manifest(root, manifest)
    return root


def ensure_synthetic(out_dir: str | os.PathLike, n: int, size: int = 256, seed: int = 0,
                     progress: bool = True) -> Path:
    """The synthetic set in ``out_dir``: reused when its manifest matches, (re)generated otherwise."""
    root = Path(out_dir)
    m = read_manifest(root)
    if m is not None and m.complete and (m.n, m.size, m.seed, m.version) == (n, size, seed, GENERATOR_VERSION):
        return root
    return generate_synthetic(root, n, size, seed, progress=progress)


def default_set_dir(image_size: int, n: int) -> Path:
    """Folder of the default synthetic set for models of ``image_size`` px."""
    return DEFAULT_ROOT / f"synthetic-{DEFAULT_UPSCALE * image_size}px-n{n}"


def ensure_default_set(folder: str | os.PathLike, n: int, image_size: int, progress: bool = True) -> Path:
    """The default synthetic set for models of ``image_size`` px in ``folder``, generated if absent."""
    return ensure_synthetic(folder, n, DEFAULT_UPSCALE * image_size, DEFAULT_SEED, progress=progress)


def wait_for_default_set(folder: str | os.PathLike, n: int, image_size: int, timeout_s: float = WAIT_TIMEOUT_S,
                         poll_s: float = WAIT_POLL_S) -> Path:
    """Wait until another process (rank 0 of a DDP job) has written the default set ``ensure_default_set`` would:
    its manifest complete and matching. A one-line error after ``timeout_s``."""
    root, size = Path(folder), DEFAULT_UPSCALE * image_size
    deadline = time.monotonic() + timeout_s
    while True:
        m = read_manifest(root)
        if m is not None and m.complete and (m.n, m.size, m.seed, m.version) == (n, size, DEFAULT_SEED,
                                                                                 GENERATOR_VERSION):
            return root
        if time.monotonic() > deadline:
            raise BenchError(f"waited {timeout_s / 60:.0f} min for {root}/{MANIFEST_NAME} to say that rank 0 wrote the "
                             f"synthetic set ({n} faces at {size} px); is the folder on a file system every process "
                             f"sees? Generate it first with `bench data synth --out {root} --n {n} --size {size}`")
        time.sleep(poll_s)
