"""Face parsing data: the CelebAMask-HQ layout (and SEAN/SDM's), merged label maps, a cached loader.

Two layouts are read:

- CelebAMask-HQ as distributed: ``CelebA-HQ-img/{i}.jpg`` and
  ``CelebAMask-HQ-mask-anno/{i // 2000}/{i:05d}_{part}.png``, one binary mask per part present.
  Parts are merged into one label map in label order (later parts overwrite earlier ones); the
  merged maps are cached (``.label-cache/`` in the data folder, or a folder you give) so the merge
  runs once per face, not once per epoch. Split: the standard 0-27999 train, 28000-29999 test; a
  smaller set is split in the same 28:2 ratio by index order.
- SEAN/SDM: ``{train,test}/images/*.jpg|png`` with ``{train,test}/labels/*.png`` label maps that
  already hold class indices.

Items are dicts: ``image`` (3, S, S) float in [-1, 1], ``label`` (S, S) int64, ``mask`` (19, S, S)
one-hot float, ``index`` int. Images are resized with antialiasing, label maps with nearest
neighbour. ``check_dataset`` (``bench data check DIR``) reports counts, resolutions, class frequencies and problems;
``preview_grid`` (``bench data preview DIR``) makes a picture of faces above their colour-coded label maps.
"""
from __future__ import annotations

import collections
import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from bench.errors import BenchError
from bench.io import atomic_write

NUM_CLASSES = 19
CLASS_NAMES = ["background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
               "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth"]
PART_NAMES = CLASS_NAMES[1:]  # the part file suffixes of CelebAMask-HQ, in merge order
PART_CLASS = {name: k for k, name in enumerate(CLASS_NAMES) if k}

# A horizontal flip turns a left part into a right one.
_SWAPS = [("l_eye", "r_eye"), ("l_brow", "r_brow"), ("l_ear", "r_ear")]
FLIP_PERMUTATION = np.arange(NUM_CLASSES)
for _a, _b in _SWAPS:
    FLIP_PERMUTATION[[PART_CLASS[_a], PART_CLASS[_b]]] = [PART_CLASS[_b], PART_CLASS[_a]]

# CelebAMask-HQ's own colour coding of the 19 classes, for pictures of label maps.
PALETTE = np.array([[0, 0, 0], [204, 0, 0], [76, 153, 0], [204, 204, 0], [51, 51, 255], [204, 0, 204],
                    [0, 255, 255], [255, 204, 204], [102, 51, 0], [255, 0, 0], [102, 204, 0], [255, 255, 0],
                    [0, 0, 153], [0, 0, 204], [255, 51, 153], [0, 204, 204], [0, 51, 0], [255, 153, 51],
                    [0, 204, 0]], dtype=np.uint8)

IMAGE_DIRNAME = "CelebA-HQ-img"
MASK_DIRNAME = "CelebAMask-HQ-mask-anno"
FACES_PER_MASK_FOLDER = 2000
CACHE_DIRNAME = ".label-cache"
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Standard SIS split of CelebAMask-HQ: the first 28000 of 30000 faces train, the rest test.
STANDARD_TRAIN, STANDARD_TOTAL = 28000, 30000
PART_FILE = re.compile(r"^(\d+)_([a-z_]+)\.png$")


class DataError(BenchError):
    """A bad data file or folder: one line that names it and says how to fix it."""

    def __init__(self, message: str):
        # A DataLoader worker re-raises our error in the main process with the worker's whole
        # traceback as the message; keep only the original one-line message.
        lines = message.strip().splitlines()
        if len(lines) > 1 and lines[0].startswith("Caught "):
            message = lines[-1].removeprefix(f"{type(self).__module__}.{type(self).__qualname__}: ")
        super().__init__(message)


def _reason(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def image_path(root: Path, index: int) -> Path:
    return Path(root) / IMAGE_DIRNAME / f"{index}.jpg"


def mask_path(root: Path, index: int, part: str) -> Path:
    return Path(root) / MASK_DIRNAME / str(index // FACES_PER_MASK_FOLDER) / f"{index:05d}_{part}.png"


def read_image(path: Path, size: int | None = None) -> np.ndarray:
    """RGB uint8 (S, S, 3), resized with antialiasing when ``size`` is given."""
    try:
        with Image.open(path) as im:
            if size is not None:
                im.draft("RGB", (size, size))   # JPEG: decode directly at a reduced scale >= size
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            return np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"image {path} is missing; restore it, or delete its mask parts") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path} ({_reason(e)}); replace it with a good copy "
                        f"(re-download or regenerate the set) or delete it and its mask parts") from None


def _open_array(path: Path, what: str) -> np.ndarray:
    """The pixels of a mask or label file; a palette part mask as its colours, a palette label map as indices."""
    try:
        with Image.open(path) as im:
            if im.mode == "P" and what == "part mask":
                im = im.convert("RGB")
            return np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"{what} {path} is missing; restore it or delete the files that refer to it") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read {what} {path} ({_reason(e)}); replace it with a good copy "
                        f"or delete it") from None


def read_part_mask(path: Path) -> np.ndarray:
    """A binary part mask as bool (H, W), whether stored as grayscale, RGB(A), palette or 1-bit.

    On means at least half the file's largest value, so 0/255 (CelebAMask-HQ) and 0/1 both work.
    """
    a = _open_array(path, "part mask")
    if a.ndim == 3:
        a = a[..., :3].max(axis=-1) if a.shape[-1] >= 3 else a[..., 0]   # drop alpha
    if a.dtype == bool:
        return a
    top = a.max()
    return a.astype(np.int64) * 2 >= top if top > 0 else np.zeros(a.shape, bool)


def read_label_png(path: Path) -> np.ndarray:
    """A label map of class indices (uint8 (H, W)); grayscale, palette or gray-as-RGB files."""
    a = _open_array(path, "label map")
    if a.ndim == 3:
        if not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
            raise DataError(f"label map {path} is colour-coded RGB; it must hold class indices 0-18 "
                            f"(one channel, CelebAMask-HQ order)")
        a = a[..., 0]
    if a.size and int(a.max()) >= NUM_CLASSES:
        raise DataError(f"label map {path} holds class {int(a.max())}, but classes are 0-{NUM_CLASSES - 1}; "
                        f"write class indices in CelebAMask-HQ order")
    if a.size and int(a.min()) < 0:
        raise DataError(f"label map {path} holds negative values; write class indices 0-{NUM_CLASSES - 1}")
    return a.astype(np.uint8)


def write_label_png(label: np.ndarray, path: Path) -> None:
    """Write a label map of class indices as a grayscale PNG, atomically."""
    png = Image.fromarray(np.asarray(label, dtype=np.uint8), mode="L")
    atomic_write(path, lambda f: png.save(f, "PNG"))


def merge_parts(parts: dict[int, Path]) -> np.ndarray:
    """Merge binary part masks (class -> file) into a label map, later classes over earlier ones.

    Parts stored at different resolutions are brought to the largest with nearest neighbour.
    """
    masks = {k: read_part_mask(p) for k, p in parts.items()}
    shape = max((m.shape for m in masks.values()), default=(0, 0))
    label = np.zeros(shape, np.uint8)
    for k in sorted(masks):
        m = masks[k]
        if m.shape != shape:
            m = np.asarray(Image.fromarray(m).resize(shape[::-1], Image.NEAREST))
        label[m] = k
    return label


def resize_label(label: np.ndarray, size: int) -> np.ndarray:
    if label.shape == (size, size):
        return label
    return np.asarray(Image.fromarray(label).resize((size, size), Image.NEAREST))


def colorize(label: np.ndarray) -> np.ndarray:
    """RGB uint8 picture of a label map in CelebAMask-HQ's colours."""
    return PALETTE[np.asarray(label)]


def onehot(label, K: int = NUM_CLASSES) -> torch.Tensor:
    """One-hot float masks: (H, W) -> (K, H, W), (B, H, W) -> (B, K, H, W); a tensor stays on its device."""
    if torch.is_tensor(label):
        label = label.long()
        lo, hi = (int(label.min()), int(label.max())) if label.numel() else (0, 0)
    else:
        label = np.asarray(label)
        lo, hi = (int(label.min()), int(label.max())) if label.size else (0, 0)
    if lo < 0 or hi >= K:
        raise ValueError(f"label values must be in 0..{K - 1}, got {lo}..{hi}")
    if torch.is_tensor(label):
        shape = (*label.shape[:-2], K, *label.shape[-2:])
        return torch.zeros(shape, device=label.device).scatter_(-3, label.unsqueeze(-3), 1.0)
    # NumPy for samples in a data-loading worker: no intra-op threads to wake up for a small tensor.
    lead, (h, w) = label.shape[:-2], label.shape[-2:]
    flat = label.reshape(-1, h * w)
    out = np.zeros((flat.shape[0], K, h * w), np.float32)
    out[np.arange(flat.shape[0])[:, None], flat, np.arange(h * w)] = 1.0
    return torch.from_numpy(out.reshape(*lead, K, h, w))


def hflip_arrays(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror an (H, W, 3) image and its (H, W) label map together, swapping left and right classes."""
    return np.ascontiguousarray(image[:, ::-1]), FLIP_PERMUTATION[label[:, ::-1]].astype(label.dtype)


# ----------------------------------------------------------------------------------------------
# Scanning the layouts
# ----------------------------------------------------------------------------------------------

@dataclass
class Record:
    """One face: its image and either its part files (CelebAMask-HQ) or its label map (SEAN/SDM)."""

    index: int
    image: Path
    parts: dict[int, Path] = field(default_factory=dict)
    label: Path | None = None


@dataclass
class Scan:
    """What a data folder holds: records, plus files that fit no record (each with the reason)."""

    layout: str                       # "celebamask-hq" or "split-folders"
    records: dict[str, list[Record]]  # "all" (CelebAMask-HQ) or "train"/"test" (SEAN/SDM)
    strays: list[tuple[Path, str]]


def detect_layout(root: Path) -> str:
    """``celebamask-hq`` or ``split-folders``; a one-line error naming what is missing otherwise."""
    root = Path(root).expanduser()
    fix = f"pass the folder that holds {IMAGE_DIRNAME}/ and {MASK_DIRNAME}/ (or train/ and test/ with " \
          f"images/ and labels/), or make a synthetic set with `bench data synth --out {root}`"
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; {fix}")
    has_img, has_mask = (root / IMAGE_DIRNAME).is_dir(), (root / MASK_DIRNAME).is_dir()
    if has_img and has_mask:
        return "celebamask-hq"
    if has_img or has_mask:
        missing = MASK_DIRNAME if has_img else IMAGE_DIRNAME
        raise DataError(f"folder {root / missing} is missing (CelebAMask-HQ layout needs both "
                        f"{IMAGE_DIRNAME}/ and {MASK_DIRNAME}/); restore it")
    if any((root / s / "images").is_dir() for s in SPLITS):
        for s in SPLITS:
            for sub in ("images", "labels"):
                if (root / s / "images").is_dir() and not (root / s / sub).is_dir():
                    raise DataError(f"folder {root / s / sub} is missing (SEAN/SDM layout needs {s}/images/ "
                                    f"and {s}/labels/); restore it")
        return "split-folders"
    raise DataError(f"{root} holds no face data set; {fix}")


def _numeric_key(p: Path):
    return (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem)


SYNTH_MANIFEST = "synth.json"  # what a synthetic set records about itself (bench.synth writes it)


def check_complete(root: Path) -> None:
    """A one-line error for a synthetic set whose manifest says it is incomplete (its generation was interrupted),
    naming the command that finishes it; nothing to check for a folder without a manifest."""
    import json

    path = Path(root) / SYNTH_MANIFEST
    if not path.is_file():
        return
    try:
        m = json.loads(path.read_text())
        complete, again = m["complete"], f"--n {int(m['n'])} --size {int(m['size'])} --seed {int(m['seed'])}"
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
        raise BenchError(f"{path} is not a readable synthetic-set manifest; generate the set again with "
                         f"`bench data synth --out {root}`") from None
    if complete is not True:
        raise BenchError(f"{root} is an incomplete synthetic set ({SYNTH_MANIFEST} says complete: false; its "
                         f"generation was interrupted): finish it with `bench data synth --out {root} {again}`")


def data_fingerprint(root: str | os.PathLike) -> str:
    """What identifies a data set wherever its folder lies: the SHA-256 of a synthetic set's manifest, else of the
    sorted list of its files (relative paths and sizes; the loaders' cache left out)."""
    root = Path(root).expanduser()
    manifest = root / SYNTH_MANIFEST
    if manifest.is_file():
        return "synth:" + hashlib.sha256(manifest.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs[:] = sorted(d for d in dirs if d != CACHE_DIRNAME and not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            path = Path(folder) / name
            h.update(f"{path.relative_to(root)}\t{path.stat().st_size}\n".encode())
    return "files:" + h.hexdigest()


def run_data_folder(config: dict, run_dir: str | os.PathLike) -> Path:
    """The data folder a run trained on, found from any working folder: the path recorded relative to the run folder
    first, then the one recorded relative to the folder training ran in; a folder whose fingerprint differs from the
    one recorded at training is a one-line error (scores against other masks would be silently wrong)."""
    run_dir = Path(run_dir)
    candidates = [run_dir / config["data_from_run"]] if config.get("data_from_run") else []
    candidates.append(Path(str(config.get("data"))).expanduser())
    found = next((c for c in candidates if c.is_dir()), None)
    if found is None:
        if config.get("synthetic"):
            return candidates[0]  # the default synthetic set, generated there on first use
        raise BenchError(f"the data folder of {run_dir} ({config.get('data')}) is not there (moved or deleted); "
                         f"put it back or give the data folder with --data")
    recorded = config.get("data_fingerprint")
    if recorded and data_fingerprint(found) != recorded:
        raise BenchError(f"{found} is not the data set {run_dir} trained on (its fingerprint differs from the one in "
                         f"config.json); give the run's data folder with --data")
    return found


def scan(root: Path) -> Scan:
    """Index a data folder of either layout (an incomplete synthetic set is refused)."""
    root = Path(root).expanduser()
    check_complete(root)
    layout = detect_layout(root)
    return _scan_celebamask(root) if layout == "celebamask-hq" else _scan_split_folders(root)


def _scan_celebamask(root: Path) -> Scan:
    strays: list[tuple[Path, str]] = []
    images: dict[int, Path] = {}
    with os.scandir(root / IMAGE_DIRNAME) as it:
        for e in it:
            p = Path(e.path)
            if p.stem.isdigit() and p.suffix.lower() in IMAGE_SUFFIXES:
                if int(p.stem) in images:
                    strays.append((p, f"a second image for face {int(p.stem)} (kept {images[int(p.stem)].name})"))
                else:
                    images[int(p.stem)] = p
            elif not e.name.startswith("."):
                strays.append((p, "not an image named {index}.jpg"))
    parts: dict[int, dict[int, Path]] = collections.defaultdict(dict)
    with os.scandir(root / MASK_DIRNAME) as folders:
        for folder in folders:
            if not folder.is_dir():
                if not folder.name.startswith("."):
                    strays.append((Path(folder.path), f"not a mask folder ({MASK_DIRNAME}/<index // 2000>/)"))
                continue
            with os.scandir(folder.path) as it:
                for e in it:
                    m = PART_FILE.match(e.name)
                    if m and m.group(2) in PART_CLASS:
                        parts[int(m.group(1))][PART_CLASS[m.group(2)]] = Path(e.path)
                    elif not e.name.startswith("."):
                        strays.append((Path(e.path), "not a part mask named {index:05d}_{part}.png "
                                                     "with a CelebAMask-HQ part name"))
    records = []
    for i in sorted(images):
        if i in parts:
            records.append(Record(i, images[i], parts=parts[i]))
        else:
            strays.append((images[i], "image without any mask part"))
    for i in sorted(set(parts) - set(images)):
        for p in sorted(parts[i].values()):
            strays.append((p, "part file for an image that does not exist"))
    return Scan("celebamask-hq", {"all": records}, strays)


def _scan_split_folders(root: Path) -> Scan:
    strays: list[tuple[Path, str]] = []
    records: dict[str, list[Record]] = {}
    for s in SPLITS:
        if not (root / s / "images").is_dir():
            records[s] = []
            continue
        imgs = {p.stem: p for p in (root / s / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        labels = {p.stem: p for p in (root / s / "labels").iterdir() if p.suffix.lower() == ".png"}
        stems = sorted(imgs, key=lambda st: _numeric_key(Path(st)))
        numeric = all(st.isdigit() for st in stems)
        out = []
        for pos, st in enumerate(stems):
            if st in labels:
                out.append(Record(int(st) if numeric else pos, imgs[st], label=labels[st]))
            else:
                strays.append((imgs[st], f"image without a label map in {s}/labels/"))
        strays += [(labels[st], f"label map without an image in {s}/images/") for st in sorted(set(labels) - set(imgs))]
        records[s] = out
    return Scan("split-folders", records, strays)


def split_records(records: list[Record], split: str | Sequence[int]) -> list[Record]:
    """Records of a split: the first 28/30 by index train, the rest test (exactly 0-27999 / 28000-29999
    on the full set); ``"all"``; or an explicit list of face indices."""
    if isinstance(split, str):
        n_train = (len(records) * STANDARD_TRAIN + STANDARD_TOTAL // 2) // STANDARD_TOTAL
        if split == "train":
            return records[:n_train]
        if split == "test":
            return records[n_train:]
        if split == "all":
            return list(records)
        raise DataError(f"unknown split {split!r}; use train, test, all or a list of face indices")
    by_index = {r.index: r for r in records}
    missing = [i for i in split if i not in by_index]
    if missing:
        raise DataError(f"split asks for faces {missing[:5]}{'...' if len(missing) > 5 else ''} that the data "
                        f"folder does not hold (or that have no mask parts); run `bench data check` on it")
    return [by_index[i] for i in split]


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------

def default_loader_workers() -> int:
    """DataLoader workers used by default: one per available core, at most 4."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))


class FaceDataset(torch.utils.data.Dataset):
    """Faces with their label maps from a CelebAMask-HQ or SEAN/SDM folder, at ``size`` px.

    ``split``: "train", "test", "all", or a list of face indices. ``flip``: mirror each sample with
    probability 1/2 (torch's RNG). ``cache_dir``: where merged label maps go (default
    ``ROOT/.label-cache``, or a per-user cache folder when the data folder is read-only);
    ``cache=False`` merges every time.
    """

    def __init__(self, root: str | os.PathLike, split: str | Sequence[int] = "train", size: int = 256,
                 flip: bool = False, cache_dir: str | os.PathLike | None = None, cache: bool = True):
        self.root = Path(root).expanduser()
        self.size = int(size)
        self.flip = flip
        found = scan(self.root)
        self.layout = found.layout
        self._warn_strays(found.strays)
        if self.layout == "celebamask-hq":
            self.records = split_records(found.records["all"], split)
        elif isinstance(split, str) and split in SPLITS:
            self.records = found.records[split]
        else:
            self.records = split_records(found.records["train"] + found.records["test"], split)
        if not self.records:
            raise DataError(f"split {split!r} of {self.root} holds no faces; check the folder with "
                            f"`bench data check {self.root}`")
        self.cache_dir = self._cache_folder(cache_dir) if cache and self.layout == "celebamask-hq" else None

    def _warn_strays(self, strays: list[tuple[Path, str]]) -> None:
        if strays:
            path, why = strays[0]
            warnings.warn(f"{self.root}: {len(strays)} files left out ({why}: {path}, ...); "
                          f"`bench data check {self.root}` lists them", stacklevel=3)

    def _cache_folder(self, cache_dir) -> Path:
        if cache_dir is not None:
            return Path(cache_dir)
        if os.access(self.root, os.W_OK):
            return self.root / CACHE_DIRNAME
        home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        digest = hashlib.blake2b(str(self.root.resolve()).encode(), digest_size=8).hexdigest()
        return home / "sis-bench" / "labels" / digest

    def __len__(self) -> int:
        return len(self.records)

    @property
    def indices(self) -> list[int]:
        return [r.index for r in self.records]

    def label_map(self, k: int) -> np.ndarray:
        """Merged label map of the ``k``-th face at its stored resolution (uint8)."""
        rec = self.records[k]
        if rec.label is not None:
            return read_label_png(rec.label)
        if self.cache_dir is None:
            return merge_parts(rec.parts)
        cached = self._cache_path(rec)
        if cached.exists():
            try:
                with Image.open(cached) as im:
                    return np.array(im)
            except OSError:
                pass    # a damaged cache entry is simply rebuilt
        label = merge_parts(rec.parts)  # raises before anything is written for a bad part file
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.cache_dir.glob(f"{rec.index:05d}-*.png"):
            if stale != cached:          # an entry for earlier versions of the part files
                stale.unlink(missing_ok=True)
        write_label_png(label, cached)
        return label

    def _cache_path(self, rec: Record) -> Path:
        """Cache file keyed on the part files' names, sizes and times, so edited parts are re-merged."""
        h = hashlib.blake2b(digest_size=6)
        for k in sorted(rec.parts):
            st = rec.parts[k].stat()
            h.update(f"{k}:{rec.parts[k].name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return self.cache_dir / f"{rec.index:05d}-{h.hexdigest()}.png"

    def __getitem__(self, k: int) -> dict:
        rec = self.records[k]
        image = read_image(rec.image, self.size)           # read first: a bad image leaves no cache entry
        label = resize_label(self.label_map(k), self.size)
        if self.flip and torch.rand(()) < 0.5:
            image, label = hflip_arrays(image, label)
        # NumPy until the end: per-sample torch ops would wake intra-op threads for tiny tensors.
        chw = image.transpose(2, 0, 1).astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)
        return {
            "image": torch.from_numpy(chw),
            "label": torch.from_numpy(label.astype(np.int64)),
            "mask": onehot(label),
            "index": rec.index,
        }


def read_label_folder(folder: str | os.PathLike, size: int | None = None) -> tuple[list[str], torch.Tensor]:
    """Label-map PNGs of a folder (class indices), sorted by name: their stems and (N, S, S) int64 labels.

    ``onehot(labels)`` turns them into the (N, 19, S, S) masks a backbone takes.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"label folder {folder} does not exist; give a folder of PNG label maps (class indices 0-18)")
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() == ".png"), key=_numeric_key)
    if not files:
        raise DataError(f"label folder {folder} holds no .png label maps; add some (class indices 0-18)")
    labels = [read_label_png(p) for p in files]
    if size is not None:
        labels = [resize_label(a, size) for a in labels]
    elif len({a.shape for a in labels}) > 1:
        raise DataError(f"label maps in {folder} have different sizes {sorted({a.shape for a in labels})}; "
                        f"give a size to resize them to")
    return [p.stem for p in files], torch.from_numpy(np.stack(labels).astype(np.int64))


# ----------------------------------------------------------------------------------------------
# bench data check
# ----------------------------------------------------------------------------------------------

@dataclass
class FaceCheck:
    """What checking one face found."""

    image_size: tuple[int, int] | None = None
    mask_sizes: list[tuple[int, int]] = field(default_factory=list)
    class_pixels: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES, np.int64))
    problems: list[str] = field(default_factory=list)


def _image_size(path: Path, problems: list[str]) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:
            im.load()    # decode fully: a truncated file only fails here
            return im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        problems.append(f"unreadable image: {path} ({_reason(e)})")
        return None


def check_face(rec: Record) -> FaceCheck:
    """Read every file of one face and list what is wrong with it."""
    out = FaceCheck()
    out.image_size = _image_size(rec.image, out.problems)
    if rec.label is not None:
        try:
            label = read_label_png(rec.label)
        except DataError as e:
            out.problems.append(f"bad label map: {e}")
            return out
        out.mask_sizes.append(label.shape[::-1])
    else:
        masks = {}
        for k, p in sorted(rec.parts.items()):
            try:
                raw = _open_array(p, "part mask")
            except DataError:
                out.problems.append(f"unreadable part mask: {p}")
                continue
            values = np.unique(raw)
            if raw.dtype != bool and not set(values.tolist()) <= {0, 255}:
                shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
                out.problems.append(f"mask values other than 0/255: {p} (values {shown})")
            masks[k] = p
            out.mask_sizes.append(raw.shape[1::-1])
        if len(set(out.mask_sizes)) > 1:
            out.problems.append(f"part masks of face {rec.index} have different sizes {sorted(set(out.mask_sizes))}: "
                                f"{rec.image}")
        try:
            label = merge_parts(masks)
        except DataError:
            return out
    out.class_pixels = np.bincount(label.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
    return out


@dataclass
class CheckReport:
    """Everything ``bench data check`` prints."""

    root: Path
    layout: str
    counts: dict[str, int]
    image_sizes: collections.Counter
    mask_sizes: collections.Counter
    class_pixels: np.ndarray
    class_faces: np.ndarray
    problems: list[str]

    def tables(self) -> str:
        import pandas as pd

        counts = pd.DataFrame({"what": list(self.counts), "count": list(self.counts.values())})
        sizes = pd.DataFrame(
            [("image", f"{w}x{h}", c) for (w, h), c in sorted(self.image_sizes.items())]
            + [("mask", f"{w}x{h}", c) for (w, h), c in sorted(self.mask_sizes.items())],
            columns=["files", "resolution (WxH)", "count"])
        total = max(int(self.class_pixels.sum()), 1)
        classes = pd.DataFrame({"class": range(NUM_CLASSES), "name": CLASS_NAMES,
                                "pixels %": 100.0 * self.class_pixels / total, "faces": self.class_faces})
        parts = [f"# {self.root} ({self.layout} layout)", "", counts.to_markdown(index=False), "",
                 sizes.to_markdown(index=False), "", "Per-class pixel frequencies (merged label maps):", "",
                 classes.to_markdown(index=False, floatfmt=".3f"), ""]
        if self.problems:
            parts += [f"{len(self.problems)} problems:"] + [f"- {p}" for p in self.problems]
        else:
            parts += ["no problems found"]
        return "\n".join(parts)


def check_dataset(root: str | os.PathLike, workers: int | None = None, progress: bool = True) -> CheckReport:
    """Read every file of a data folder; count, measure and list every problem with its path."""
    from tqdm import tqdm

    root = Path(root).expanduser()
    found = scan(root)
    problems = [f"{why}: {p}" for p, why in found.strays]
    if found.layout == "celebamask-hq":
        records = found.records["all"]
        counts = {"images": len(records) + sum(why == "image without any mask part" for _, why in found.strays),
                  "faces with mask parts": len(records),
                  "part files": sum(len(r.parts) for r in records),
                  "train faces": len(split_records(records, "train")),
                  "test faces": len(split_records(records, "test"))}
    else:
        records = found.records["train"] + found.records["test"]
        counts = {f"{s} pairs (image + label map)": len(found.records[s]) for s in SPLITS}
    workers = default_loader_workers() if workers is None else max(1, workers)
    bar = dict(total=len(records), desc="checking faces", unit="face", disable=not progress)
    if workers == 1 or len(records) < 64:
        results = [check_face(r) for r in tqdm(records, **bar)]
    else:
        import multiprocessing

        with multiprocessing.get_context().Pool(workers) as pool:
            results = list(tqdm(pool.imap(check_face, records, chunksize=16), **bar))
    image_sizes, mask_sizes = collections.Counter(), collections.Counter()
    class_pixels = np.zeros(NUM_CLASSES, np.int64)
    class_faces = np.zeros(NUM_CLASSES, np.int64)
    for res in results:
        if res.image_size:
            image_sizes[res.image_size] += 1
        mask_sizes.update(res.mask_sizes)
        class_pixels += res.class_pixels
        class_faces += res.class_pixels > 0
        problems += res.problems
    return CheckReport(root, found.layout, counts, image_sizes, mask_sizes, class_pixels, class_faces, problems)


def preview_grid(dataset: FaceDataset, n: int = 16, columns: int = 8) -> np.ndarray:
    """RGB uint8 picture of the first ``n`` faces: each image above its colour-coded label map."""
    tiles = []
    for k in range(min(n, len(dataset))):
        s = dataset[k]
        image = ((s["image"].permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
        tiles.append(np.concatenate([image, colorize(s["label"].numpy())], axis=0))
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % columns)
    rows = [np.concatenate(tiles[r:r + columns], axis=1) for r in range(0, len(tiles), columns)]
    return np.concatenate(rows, axis=0)
