"""The synthetic-face generator: layout, determinism, variety, and reuse of an existing set."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bench import data
from bench.cli import app
from bench.data import CLASS_NAMES, IMAGE_DIRNAME, MASK_DIRNAME, NUM_CLASSES, PART_CLASS
from bench.errors import BenchError
from bench.synth import MANIFEST_NAME, ensure_synthetic, generate_synthetic, make_face, sample_geometry
from bench.synth import writer as synth_writer
from bench.synth.geometry import HAIR_STYLES


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def test_layout_matches_celebamask_hq(tmp_path):
    root = generate_synthetic(tmp_path / "s", n=5, size=64, seed=0, progress=False)
    images = sorted(p.name for p in (root / IMAGE_DIRNAME).iterdir())
    assert images == [f"{i}.jpg" for i in range(5)]
    with Image.open(root / IMAGE_DIRNAME / "3.jpg") as im:
        assert (im.size, im.mode, im.format) == ((64, 64), "RGB", "JPEG")
    parts = sorted((root / MASK_DIRNAME / "0").iterdir())
    assert {p.parent.name for p in parts} == {"0"}
    for p in parts:
        m = re.fullmatch(r"(\d{5})_([a-z_]+)\.png", p.name)
        assert m and int(m.group(1)) < 5 and m.group(2) in PART_CLASS
        with Image.open(p) as im:
            a = np.asarray(im)
            assert im.size == (32, 32) and im.mode == "L"      # masks at half the image size
        assert set(np.unique(a)) <= {0, 255} and a.max() == 255
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert manifest["complete"] and (manifest["n"], manifest["size"], manifest["seed"]) == (5, 64, 0)


def test_mask_folders_hold_2000_faces_each():
    assert data.mask_path(Path("r"), 4321, "skin") == Path("r") / MASK_DIRNAME / "2" / "04321_skin.png"


def test_parts_merge_into_the_generators_label_map():
    for i in range(8):
        face = make_face(0, i, 96)
        merged = np.zeros_like(face.label)
        for part in CLASS_NAMES[1:]:            # label order: later parts overwrite earlier ones
            if part in face.parts:
                merged[face.parts[part]] = PART_CLASS[part]
        np.testing.assert_array_equal(merged, face.label)
        assert all(face.parts[p].any() for p in face.parts)    # no empty part files


def test_part_masks_overlap_like_real_annotations():
    # Skin covers the eyes in CelebAMask-HQ's annotations; the merge order hides the overlap.
    face = make_face(0, 1, 128)
    eyes = face.label == PART_CLASS["l_eye"]
    assert eyes.any() and face.parts["skin"][eyes].all()


def test_all_19_classes_occur_in_a_modest_set():
    seen = np.zeros(NUM_CLASSES, bool)
    for i in range(60):
        seen |= np.bincount(make_face(1, i, 64).label.ravel(), minlength=NUM_CLASSES) > 0
    assert seen.all(), [CLASS_NAMES[k] for k in np.flatnonzero(~seen)]


def test_geometry_varies():
    gs = [sample_geometry(np.random.default_rng([0, i, 0])) for i in range(80)]
    assert len({g.hair for g in gs}) == len(HAIR_STYLES)
    assert {g.mouth_open > 0 for g in gs} == {True, False}
    assert np.std([g.tilt for g in gs]) > 0.05 and np.std([g.scale for g in gs]) > 0.01
    assert {bool(g.glasses) for g in gs} == {True, False} and {bool(g.hat) for g in gs} == {True, False}


def test_same_mask_can_look_different():
    a, b = make_face(0, 2, 64), make_face(0, 2, 64, appearance_seed=7)
    np.testing.assert_array_equal(a.label, b.label)
    assert np.abs(a.image.astype(int) - b.image.astype(int)).mean() > 10


def test_image_follows_the_mask():
    # The hair region and the skin region differ in colour on average (rendered from the label map).
    face = make_face(0, 0, 128)
    label = np.kron(face.label, np.ones((2, 2), np.uint8))
    skin = face.image[label == PART_CLASS["skin"]].mean(0)
    cloth = face.image[label == PART_CLASS["cloth"]].mean(0)
    assert np.abs(skin - cloth).sum() > 20


def test_deterministic_and_independent_of_n_and_workers(tmp_path):
    a = generate_synthetic(tmp_path / "a", n=4, size=32, seed=5, workers=1, progress=False)
    b = generate_synthetic(tmp_path / "b", n=10, size=32, seed=5, workers=2, progress=False)
    da, db = _digests(a), _digests(b)
    assert da == {k: v for k, v in db.items() if k in da}
    c = generate_synthetic(tmp_path / "c", n=4, size=32, seed=6, workers=1, progress=False)
    assert _digests(c) != da
    np.testing.assert_array_equal(make_face(5, 3, 32).image, make_face(5, 3, 32).image)


def test_ensure_synthetic_reuses_a_matching_set(tmp_path, monkeypatch):
    root = ensure_synthetic(tmp_path / "s", n=3, size=32, seed=0, progress=False)
    before = _digests(root)

    def fail(*a, **k):
        raise AssertionError("regenerated a matching set")

    monkeypatch.setattr(synth_writer, "generate_synthetic", fail)
    assert ensure_synthetic(root, n=3, size=32, seed=0) == root
    monkeypatch.undo()
    ensure_synthetic(root, n=4, size=32, seed=0, progress=False)      # another n: regenerated
    after = _digests(root)
    assert len(after) > len(before) and {k: after[k] for k in before} == before


def test_interrupted_set_is_regenerated(tmp_path):
    root = generate_synthetic(tmp_path / "s", n=3, size=32, seed=0, progress=False)
    m = json.loads((root / MANIFEST_NAME).read_text())
    (root / MANIFEST_NAME).write_text(json.dumps({**m, "complete": False}))
    (root / IMAGE_DIRNAME / "2.jpg").unlink()
    ensure_synthetic(root, n=3, size=32, seed=0, progress=False)
    assert (root / IMAGE_DIRNAME / "2.jpg").exists()
    assert json.loads((root / MANIFEST_NAME).read_text())["complete"]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(BenchError, match="not empty"):
        generate_synthetic(tmp_path, n=2, size=32, seed=0, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("size", [15, 8])
def test_bad_size_is_a_one_line_cli_error(tmp_path, size):
    r = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "s"), "--n", "2", "--size", str(size)])
    assert r.exit_code == 2
    assert r.stderr.startswith("error: --size") and r.stderr.count("\n") == 1 and "Traceback" not in r.output
