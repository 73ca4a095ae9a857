"""Face parser: network shapes, flip augmentation, save/load, training on synthetic faces, the CLI."""
import pytest
import torch
from typer.testing import CliRunner

from bench import parser as fp
from bench.cli import app
from bench.data import CLASS_NAMES, FLIP_PERMUTATION
from bench.errors import BenchError
from bench.synth import generate_synthetic

SIZE = 16  # the tiny preset's image size


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """48 synthetic faces (45 train, 3 test) at 32 px, read at 16 px."""
    return generate_synthetic(tmp_path_factory.mktemp("faces"), n=48, size=32, seed=0, workers=1, progress=False)


def test_parser_maps_images_to_class_logits():
    model = fp.FaceParser(fp.ParserConfig(size=SIZE, width=8))
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    assert model(x).shape == (2, len(CLASS_NAMES), SIZE, SIZE)
    assert model.predict(torch.rand(2, 3, 2 * SIZE, 2 * SIZE)).shape == (2, SIZE, SIZE)  # resized to its size


def test_parser_size_must_survive_the_downsamplings():
    with pytest.raises(BenchError, match="multiple of 4"):
        fp.FaceParser(fp.ParserConfig(size=18, levels=2))


@pytest.mark.parametrize("size, width, levels", [(16, 32, 2), (32, 32, 2), (48, 16, 2), (64, 16, 3), (96, 16, 3),
                                                 (128, 16, 4), (256, 16, 5)])
def test_default_network_deepens_with_the_resolution(size, width, levels):
    """The bottleneck stays near 8 x 8 cells (never under 2 levels), and the size divides by every level."""
    cfg = fp.ParserConfig.for_size(size)
    assert (cfg.size, cfg.width, cfg.levels) == (size, width, levels)
    with torch.device("meta"):
        assert fp.FaceParser(cfg)(torch.empty(1, 3, size, size)).shape == (1, len(CLASS_NAMES), size, size)


def test_flip_augmentation_mirrors_image_and_swaps_left_right_classes():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, len(CLASS_NAMES), (4, 8, 8), dtype=torch.uint8)
    plain = [(im.float() / 127.5 - 1, lab.long()) for im, lab in zip(images, labels)]
    flipped = [(im.flip(-1), torch.as_tensor(FLIP_PERMUTATION)[lab.flip(-1)]) for im, lab in plain]
    batches = fp._batches(images, labels, 8, torch.Generator().manual_seed(0))
    kinds = set()
    for _ in range(5):
        for x, y in zip(*next(batches)):
            match = [(kind, torch.equal(y, pair[1])) for kind, pairs in (("plain", plain), ("flipped", flipped))
                     for pair in pairs if torch.equal(x, pair[0])]
            assert len(match) == 1 and match[0][1]  # the label went with its image, left/right swapped if flipped
            kinds.add(match[0][0])
    assert kinds == {"plain", "flipped"}
    assert FLIP_PERMUTATION[CLASS_NAMES.index("l_eye")] == CLASS_NAMES.index("r_eye")


def test_soft_dice_loss_is_zero_for_a_confident_right_answer_and_weighs_small_classes():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 0, 0] = 4  # one pixel of a small part
    right = torch.nn.functional.one_hot(labels, len(CLASS_NAMES)).permute(0, 3, 1, 2).float() * 50
    assert fp.soft_dice_loss(right, labels) < 1e-3
    missed = right.clone()
    missed[0, :, 0, 0] = right[0, :, 1, 1]  # the small part predicted as background
    # cross-entropy moves by 1/64 of one pixel's loss; Dice loses half of its mean (class 4 scores ~0)
    assert fp.soft_dice_loss(missed, labels) > 0.49


def test_save_and_load_keep_weights_config_and_meta(tmp_path):
    model = fp.FaceParser(fp.ParserConfig(size=SIZE, width=8)).eval()
    path = tmp_path / "sub" / "p.pt"
    fp.save_parser(model, path, {"test_miou": 0.5})
    loaded, meta = fp.load_parser(path)
    assert loaded.config == model.config and meta == {"test_miou": 0.5}
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    assert torch.equal(loaded(x), model(x))
    assert [p.name for p in path.parent.iterdir()] == ["p.pt"]  # no temporary file left behind


def test_missing_or_foreign_parser_file_is_a_one_line_error(tmp_path):
    with pytest.raises(BenchError, match="bench parser train"):
        fp.load_parser(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"something": 1}, bad)
    with pytest.raises(BenchError, match=f"{bad}.*not a readable"):
        fp.load_parser(bad)


def test_training_beats_the_untrained_parser(faces):
    cfg = fp.ParserConfig(size=SIZE, width=16)
    torch.manual_seed(0)
    before = fp.evaluate(fp.FaceParser(cfg).eval(), faces, "train")
    train = fp.ParserTrainConfig(steps=300, batch_size=16, warmup=5, lr=1e-2)
    model = fp.train_parser(faces, cfg, train, progress=False)
    after = fp.evaluate(model, faces, "train")
    assert after > before + 0.2


def test_cli_trains_into_the_default_location(faces, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["parser", "train", "--data", str(faces), "--size", str(SIZE),
                                      "--steps", "3", "--width", "8", "--levels", "1"])
    assert result.exit_code == 0, result.output
    assert "mIoU on real test images" in result.output
    model, meta = fp.load_parser(tmp_path / "results" / "parser" / f"parser-{SIZE}px.pt")
    assert model.config.size == SIZE and 0 <= meta["test_miou"] <= 1 and meta["steps"] == 3
    assert (model.config.width, model.config.levels) == (8, 1)  # the options override the size's default


def test_cli_empty_test_split_is_a_one_line_error(tmp_path):
    one = generate_synthetic(tmp_path / "one", n=1, size=32, seed=0, workers=1, progress=False)  # all train
    result = CliRunner().invoke(app, ["parser", "train", "--data", str(one), "--size", str(SIZE), "--steps", "1"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(one) in lines[0] and "test" in lines[0]


@pytest.mark.slow
def test_parser_ceiling_on_real_synthetic_test_faces(tmp_path):
    """The parser's mIoU on real test faces at the cpu preset's 32 px (about ten minutes on two cores).

    Measured after 3000 steps at batch 32 on 2000 faces: 0.905 on train faces, 0.718 on test faces; on 20000
    faces: 0.773 and 0.759. The small parts (brows, lips, necklace, earrings: one or two pixels wide at 32 px)
    are what separates the two; the 0.9 of the issue needs far more steps on many faces, or a higher resolution.
    """
    data = generate_synthetic(tmp_path / "faces", n=2000, size=64, seed=0, progress=False)
    model = fp.train_parser(data, fp.ParserConfig(size=32), fp.ParserTrainConfig(steps=3000), progress=False)
    assert fp.evaluate(model, data, "test") >= 0.68
