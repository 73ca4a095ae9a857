"""The face loader: both layouts, the merge, the split, flips, the cache, real-layout quirks, errors, check."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import bench.data as data
from bench.cli import app
from bench.data import (
    CACHE_DIRNAME,
    IMAGE_DIRNAME,
    MASK_DIRNAME,
    NUM_CLASSES,
    PART_CLASS,
    DataError,
    FaceDataset,
    Record,
    check_dataset,
    hflip_arrays,
    onehot,
    read_label_folder,
    split_records,
    write_label_png,
)
from bench.synth import generate_synthetic, make_face

SEED, N, SIZE = 3, 12, 64


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("synth") / "faces", n=N, size=SIZE, seed=SEED, progress=False)


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# --- hand-made CelebAMask-HQ fixtures --------------------------------------------------------

def _image(path: Path, size=(40, 40), colour=(200, 120, 90)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _part(root: Path, index: int, part: str, mask: np.ndarray, mode="L", on=255):
    path = root / MASK_DIRNAME / str(index // 2000) / f"{index:05d}_{part}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    a = (mask * on).astype(np.uint8)
    if mode == "RGB":
        Image.fromarray(np.stack([a] * 3, -1), "RGB").save(path)
    elif mode == "1":
        Image.fromarray(mask.astype(bool)).save(path)
    else:
        Image.fromarray(a, "L").save(path)
    return path


def _box(size, r0, r1, c0, c1):
    m = np.zeros((size, size), bool)
    m[r0:r1, c0:c1] = True
    return m


@pytest.fixture
def quirky(tmp_path):
    """Three faces: 40 px images with 20 px masks; parts missing, RGB, 1-bit and 0/1 masks."""
    root = tmp_path / "quirky"
    for i in range(3):
        _image(root / IMAGE_DIRNAME / f"{i}.jpg")
    _part(root, 0, "skin", _box(20, 2, 18, 2, 18))
    _part(root, 0, "hair", _box(20, 0, 6, 0, 20), mode="RGB")          # stored as RGB
    _part(root, 0, "l_eye", _box(20, 8, 10, 4, 8), mode="1")           # stored as 1-bit
    _part(root, 1, "skin", _box(20, 5, 15, 5, 15), on=1)               # 0/1 values; no hair, no eyes
    _part(root, 2, "cloth", _box(20, 15, 20, 0, 20))
    _part(root, 2, "neck", _box(20, 12, 20, 8, 12))                    # neck then cloth: cloth wins
    return root


def test_quirks_merge_as_expected(quirky):
    ds = FaceDataset(quirky, split="all", size=20, cache=False)
    want0 = np.zeros((20, 20), np.uint8)
    want0[2:18, 2:18] = PART_CLASS["skin"]
    want0[8:10, 4:8] = PART_CLASS["l_eye"]
    want0[0:6, :] = PART_CLASS["hair"]
    np.testing.assert_array_equal(ds[0]["label"].numpy(), want0)
    np.testing.assert_array_equal(ds[1]["label"].numpy(), _box(20, 5, 15, 5, 15) * PART_CLASS["skin"])
    want2 = np.zeros((20, 20), np.uint8)
    want2[12:20, 8:12] = PART_CLASS["neck"]
    want2[15:20, :] = PART_CLASS["cloth"]
    np.testing.assert_array_equal(ds[2]["label"].numpy(), want2)


def test_masks_and_images_at_different_resolutions(quirky):
    s = FaceDataset(quirky, split="all", size=40, cache=False)[0]
    assert s["image"].shape == (3, 40, 40) and s["label"].shape == (40, 40)
    big = np.kron(FaceDataset(quirky, split="all", size=20, cache=False)[0]["label"].numpy(), np.ones((2, 2), int))
    np.testing.assert_array_equal(s["label"].numpy(), big)                # nearest neighbour, no new classes


def test_parts_of_different_sizes_are_brought_to_the_largest(tmp_path):
    root = tmp_path / "mixed"
    _image(root / IMAGE_DIRNAME / "0.jpg")
    _part(root, 0, "skin", _box(20, 0, 20, 0, 10))
    _part(root, 0, "nose", _box(10, 0, 10, 0, 5))
    label = FaceDataset(root, split="all", size=20, cache=False)[0]["label"].numpy()
    assert (label[:, :10] == PART_CLASS["nose"]).all() and (label[:, 10:] == 0).all()


def test_strays_are_left_out_with_a_warning(quirky):
    _image(quirky / IMAGE_DIRNAME / "7.jpg")                               # image without any part
    _part(quirky, 9, "skin", _box(20, 0, 5, 0, 5))                         # part without an image
    with pytest.warns(UserWarning, match="bench data check"):
        ds = FaceDataset(quirky, split="all", size=20)
    assert ds.indices == [0, 1, 2]


# --- the synthetic set through the loader ------------------------------------------------------

def test_loader_labels_equal_the_generators(synth_set):
    ds = FaceDataset(synth_set, split="all", size=SIZE // 2)
    assert ds.indices == list(range(N))
    for k in range(N):
        np.testing.assert_array_equal(ds[k]["label"].numpy(), make_face(SEED, k, SIZE).label)
    up = FaceDataset(synth_set, split="all", size=SIZE)[5]["label"].numpy()
    np.testing.assert_array_equal(up, np.kron(make_face(SEED, 5, SIZE).label, np.ones((2, 2), np.uint8)))


def test_item_contract(synth_set):
    s = FaceDataset(synth_set, split="train", size=32)[1]
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
    assert -1.0 <= s["image"].min() < s["image"].max() <= 1.0
    assert s["label"].shape == (32, 32) and s["label"].dtype == torch.int64
    assert s["mask"].shape == (NUM_CLASSES, 32, 32) and s["mask"].dtype == torch.float32
    assert torch.equal(s["mask"].argmax(0), s["label"])
    assert torch.equal(s["mask"].sum(0), torch.ones(32, 32))
    assert s["index"] == 1
    native = FaceDataset(synth_set, split="train", size=SIZE)[1]["image"]
    image = np.asarray(Image.open(synth_set / IMAGE_DIRNAME / "1.jpg").convert("RGB"))
    np.testing.assert_allclose(((native.permute(1, 2, 0) + 1) * 127.5).numpy(), image, atol=1e-3)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_images_are_downsampled_with_antialiasing(tmp_path, suffix):
    # A one-pixel checkerboard averages to grey; point sampling would keep it black and white.
    root = tmp_path / "checker"
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    (root / IMAGE_DIRNAME).mkdir(parents=True)
    Image.fromarray(np.stack([checker] * 3, -1)).save(root / IMAGE_DIRNAME / f"0{suffix}", quality=100)
    _part(root, 0, "skin", _box(32, 0, 32, 0, 32))
    image = FaceDataset(root, split="all", size=16, cache=False)[0]["image"]
    assert image.abs().max() < 0.15


def test_split_by_ratio_and_standard_split(synth_set):
    train, test = FaceDataset(synth_set, "train", size=16), FaceDataset(synth_set, "test", size=16)
    assert train.indices == list(range(11)) and test.indices == [11]         # round(12 * 28 / 30) = 11
    full = [Record(i, Path(f"{i}.jpg")) for i in range(30000)]
    tr, te = split_records(full, "train"), split_records(full, "test")
    assert (tr[0].index, tr[-1].index, len(tr)) == (0, 27999, 28000)
    assert (te[0].index, te[-1].index, len(te)) == (28000, 29999, 2000)
    assert FaceDataset(synth_set, [7, 2], size=16).indices == [7, 2]
    with pytest.raises(DataError, match="does not hold"):
        FaceDataset(synth_set, [2, 99], size=16)
    with pytest.raises(DataError, match="unknown split"):
        FaceDataset(synth_set, "val", size=16)


# --- flips --------------------------------------------------------------------------------------

def test_flip_mirrors_and_swaps_left_right():
    label = np.zeros((4, 6), np.uint8)
    label[1, 0], label[1, 5] = PART_CLASS["l_eye"], PART_CLASS["r_eye"]
    label[0, 1], label[0, 4] = PART_CLASS["l_brow"], PART_CLASS["r_brow"]
    label[2, 0], label[3, 2] = PART_CLASS["l_ear"], PART_CLASS["nose"]
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    fimg, flab = hflip_arrays(image, label)
    np.testing.assert_array_equal(fimg, image[:, ::-1])
    want = np.zeros_like(label)
    want[1, 5], want[1, 0] = PART_CLASS["r_eye"], PART_CLASS["l_eye"]         # mirrored and renamed
    want[0, 4], want[0, 1] = PART_CLASS["r_brow"], PART_CLASS["l_brow"]
    want[2, 5], want[3, 3] = PART_CLASS["r_ear"], PART_CLASS["nose"]
    np.testing.assert_array_equal(flab, want)
    np.testing.assert_array_equal(hflip_arrays(fimg, flab)[1], label)          # an involution


def test_dataset_flips_about_half_of_the_samples(synth_set):
    plain = FaceDataset(synth_set, split="all", size=32)
    flipping = FaceDataset(synth_set, split="all", size=32, flip=True)
    torch.manual_seed(0)
    flipped = 0
    for k in range(N):
        a, b = plain[k], flipping[k]
        if torch.equal(a["image"], b["image"]):
            assert torch.equal(a["label"], b["label"])
            continue
        flipped += 1
        assert torch.equal(b["image"], a["image"].flip(-1))
        swapped = torch.as_tensor(data.FLIP_PERMUTATION)[a["label"].flip(-1)]
        assert torch.equal(b["label"], swapped)
        assert torch.equal(b["mask"], onehot(swapped))
        left, right = PART_CLASS["l_eye"], PART_CLASS["r_eye"]
        assert (b["label"] == left).sum() == (a["label"] == right).sum()
    assert 0 < flipped < N


# --- the cache ---------------------------------------------------------------------------------

def test_merge_runs_once_then_the_cache_serves(quirky, monkeypatch):
    first = [s["label"] for s in FaceDataset(quirky, split="all", size=20)]
    assert len(list((quirky / CACHE_DIRNAME).glob("*.png"))) == 3

    def no_merge(parts):
        raise AssertionError("merged again")

    monkeypatch.setattr(data, "merge_parts", no_merge)
    again = [s["label"] for s in FaceDataset(quirky, split="all", size=20)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_edited_parts_invalidate_the_cache(quirky):
    ds = FaceDataset(quirky, split="all", size=20)
    before = ds[1]["label"]
    p = _part(quirky, 1, "skin", _box(20, 0, 20, 0, 20))
    os.utime(p, ns=(1, 1))              # a different time and size: a different cache key
    after = FaceDataset(quirky, split="all", size=20)[1]["label"]
    assert (after == PART_CLASS["skin"]).all() and not torch.equal(before, after)
    assert len(list((quirky / CACHE_DIRNAME).glob("00001-*.png"))) == 1


def test_cache_dir_can_be_given(quirky, tmp_path):
    FaceDataset(quirky, split="all", size=20, cache_dir=tmp_path / "c")[0]
    assert len(list((tmp_path / "c").glob("00000-*.png"))) == 1 and not (quirky / CACHE_DIRNAME).exists()


# --- errors --------------------------------------------------------------------------------------

def test_corrupt_image_names_the_file_and_writes_no_cache(quirky):
    bad = quirky / IMAGE_DIRNAME / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:60])                                    # truncated
    ds = FaceDataset(quirky, split="all", size=20)
    with pytest.raises(DataError) as e:
        ds[1]
    msg = str(e.value)
    assert str(bad) in msg and "replace it" in msg and "\n" not in msg
    assert not list((quirky / CACHE_DIRNAME).glob("00001-*"))
    ds[0]
    assert list((quirky / CACHE_DIRNAME).glob("00000-*.png"))                  # good faces are cached


def test_corrupt_part_mask_writes_no_cache(quirky):
    bad = quirky / MASK_DIRNAME / "0" / "00002_neck.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="00002_neck.png"):
        FaceDataset(quirky, split="all", size=20)[2]
    assert not list((quirky / CACHE_DIRNAME).glob("00002-*"))


def test_corrupt_image_through_dataloader_workers_is_one_line(quirky):
    bad = quirky / IMAGE_DIRNAME / "2.jpg"
    bad.write_bytes(b"garbage")
    batches = iter(torch.utils.data.DataLoader(FaceDataset(quirky, split="all", size=20), batch_size=3, num_workers=1))
    try:
        next(batches)
    except DataError as e:
        msg = str(e)
        e.__traceback__ = None    # its frames hold the iterator; freed now, `del` stops the worker at once
    del batches                   # (left to the garbage collector, the shutdown waits 5 s in a later test)
    assert msg.startswith(f"cannot read image {bad}") and "\n" not in msg


def test_cli_one_line_errors(tmp_path, quirky):
    r = _cli("data", "check", tmp_path / "nowhere")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: data folder {tmp_path / 'nowhere'} does not exist")
    assert "bench data synth" in r.stderr
    (quirky / IMAGE_DIRNAME / "0.jpg").write_bytes(b"garbage")
    r = _cli("data", "preview", quirky, "--out", tmp_path / "p.png", "--split", "all", "--size", "20")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.output
    assert f"cannot read image {quirky / IMAGE_DIRNAME / '0.jpg'}" in r.stderr


def test_missing_mask_folder_is_named(tmp_path):
    _image(tmp_path / "d" / IMAGE_DIRNAME / "0.jpg")
    with pytest.raises(DataError, match=f"folder {tmp_path / 'd' / MASK_DIRNAME} is missing"):
        FaceDataset(tmp_path / "d")


# --- SEAN/SDM layout and label folders ---------------------------------------------------------

@pytest.fixture
def sean(tmp_path):
    root = tmp_path / "sean"
    rng = np.random.default_rng(0)
    for split, stems in (("train", ["3", "10", "2"]), ("test", ["28000"])):
        for st in stems:
            _image(root / split / "images" / f"{st}.jpg", size=(24, 24))
            (root / split / "labels").mkdir(parents=True, exist_ok=True)
            write_label_png(rng.integers(0, NUM_CLASSES, (12, 12)), root / split / "labels" / f"{st}.png")
    return root


def test_split_folder_layout(sean):
    train = FaceDataset(sean, "train", size=12)
    assert train.layout == "split-folders" and train.indices == [2, 3, 10] and train.cache_dir is None
    want = np.asarray(Image.open(sean / "train" / "labels" / "10.png"))
    np.testing.assert_array_equal(train[2]["label"].numpy(), want)
    assert FaceDataset(sean, "test", size=12).indices == [28000]
    assert len(FaceDataset(sean, "all", size=12)) == 4


def test_label_values_out_of_range_name_the_file(sean):
    bad = sean / "train" / "labels" / "3.png"
    Image.fromarray(np.full((12, 12), 19, np.uint8)).save(bad)
    with pytest.raises(DataError, match=f"label map {bad} holds class 19"):
        FaceDataset(sean, "train", size=12)[1]
    r = _cli("data", "check", sean)
    assert r.exit_code == 1 and str(bad) in r.stdout


def test_colour_coded_labels_are_refused_and_gray_rgb_accepted(sean):
    path = sean / "train" / "labels" / "2.png"
    gray = np.asarray(Image.open(path))
    Image.fromarray(np.stack([gray] * 3, -1)).save(path)
    np.testing.assert_array_equal(FaceDataset(sean, "train", size=12)[0]["label"].numpy(), gray)
    Image.fromarray(data.colorize(gray)).save(path)
    with pytest.raises(DataError, match="colour-coded"):
        FaceDataset(sean, "train", size=12)[0]


def test_read_label_folder(sean, tmp_path):
    names, labels = read_label_folder(sean / "train" / "labels")
    assert names == ["2", "3", "10"] and labels.shape == (3, 12, 12) and labels.dtype == torch.int64
    np.testing.assert_array_equal(labels[2].numpy(), np.asarray(Image.open(sean / "train" / "labels" / "10.png")))
    assert read_label_folder(sean / "train" / "labels", size=24)[1].shape == (3, 24, 24)
    with pytest.raises(DataError, match="does not exist"):
        read_label_folder(tmp_path / "none")


def test_onehot_numpy_and_torch_agree():
    label = np.random.default_rng(0).integers(0, NUM_CLASSES, (2, 5, 7))
    a, b = onehot(label), onehot(torch.from_numpy(label))
    assert a.shape == (2, NUM_CLASSES, 5, 7) and torch.equal(a, b) and torch.equal(a.argmax(1), torch.from_numpy(label))
    assert onehot(label[0]).shape == (NUM_CLASSES, 5, 7)
    with pytest.raises(ValueError, match="0..18"):
        onehot(np.full((2, 2), 19))


# --- bench data check ---------------------------------------------------------------------------

def test_synth_then_check_exactly_as_written(tmp_path):
    out = tmp_path / "DIR"
    r = _cli("data", "synth", "--out", out, "--n", "40", "--size", "128", "--seed", "0")
    assert r.exit_code == 0, r.output
    r = _cli("data", "check", out)
    assert r.exit_code == 0, r.output
    assert "no problems found" in r.stdout and "| images" in r.stdout and "128x128" in r.stdout and "64x64" in r.stdout
    for name in data.CLASS_NAMES:
        assert f"| {name} " in r.stdout


def test_check_lists_every_problem_with_its_path(quirky):
    _image(quirky / IMAGE_DIRNAME / "5.jpg")                                 # image without any part
    orphan = _part(quirky, 8, "nose", _box(20, 0, 2, 0, 2))                   # part without an image
    gray = _part(quirky, 2, "hat", _box(20, 0, 3, 0, 3), on=128)              # values other than 0/255
    broken = quirky / IMAGE_DIRNAME / "1.jpg"
    broken.write_bytes(broken.read_bytes()[:80])                              # unreadable image
    report = check_dataset(quirky, progress=False)
    text = "\n".join(report.problems)
    assert f"image without any mask part: {quirky / IMAGE_DIRNAME / '5.jpg'}" in text
    assert f"part file for an image that does not exist: {orphan}" in text
    assert f"mask values other than 0/255: {gray}" in text
    assert f"unreadable image: {broken}" in text
    assert f"mask values other than 0/255: {quirky / MASK_DIRNAME / '0' / '00001_skin.png'}" in text   # the 0/1 mask
    assert len(report.problems) == 5
    r = _cli("data", "check", quirky)
    assert r.exit_code == 1 and str(broken) in r.stdout


def test_check_counts_and_frequencies(synth_set):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = check_dataset(synth_set, progress=False)
    assert report.problems == []
    assert report.counts["images"] == N and report.counts["train faces"] + report.counts["test faces"] == N
    assert dict(report.image_sizes) == {(SIZE, SIZE): N}
    want = sum(np.bincount(make_face(SEED, i, SIZE).label.ravel(), minlength=NUM_CLASSES) for i in range(N))
    np.testing.assert_array_equal(report.class_pixels, want)


def test_portable_paths_carry_no_machine_layout(tmp_path, monkeypatch):
    from pathlib import Path

    from bench.io import display_path as portable

    (tmp_path / "work" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    assert portable(tmp_path / "work" / "data") == "data" and portable(tmp_path / "work") == "."
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert portable(tmp_path / "home" / "w.pth") == "~/w.pth"
    assert Path(portable(tmp_path / "home" / "w.pth")).expanduser() == tmp_path / "home" / "w.pth"
    assert portable("/elsewhere/x") == "/elsewhere/x"
