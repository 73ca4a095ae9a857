"""The sampler and the `bench train` / `bench sample` commands, end to end on tiny models."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bench.autoencoder import PixelSpace
from bench.cli import app
from bench.data import onehot, read_label_png, write_label_png
from bench.sample import Run, generate, noise_for
from bench.synth import ensure_synthetic

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def bench(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("faces"), n=24, size=32, seed=0, progress=False)


def test_noise_depends_only_on_seed_and_index():
    whole = noise_for(range(6), seed=7, shape=(3, 4, 4))
    assert torch.equal(noise_for([3], seed=7, shape=(3, 4, 4))[0], whole[3])
    assert not torch.equal(noise_for([3], seed=8, shape=(3, 4, 4))[0], whole[3])
    assert not torch.equal(whole[0], whole[1])


@pytest.fixture(scope="module")
def random_run():
    """A tiny DiT whose zero-initialised output layers are given random weights, so the mask matters."""
    from models import create_model

    torch.manual_seed(0)
    model = create_model("dit", "tiny")
    for p in model.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return Run(model.eval().requires_grad_(False), PixelSpace(), {"model": "dit"}, 0, Path("."), torch.device("cpu"))


def test_sample_is_independent_of_batch_size(random_run):
    labels = torch.randint(0, 19, (5, 16, 16))
    a, nfe = generate(random_run, onehot(labels), range(5), seed=3, steps=4, batch_size=5)
    b, _ = generate(random_run, onehot(labels[[2, 3]]), [2, 3], seed=3, steps=4, batch_size=1)
    torch.testing.assert_close(b, a[[2, 3]], rtol=1e-5, atol=1e-5)  # BLAS may sum batches in another order
    assert nfe == 4 and a.shape == (5, 3, 16, 16) and a.abs().max() <= 1
    c, nfe_heun = generate(random_run, onehot(labels[:1]), [0], seed=3, steps=4, method="heun")
    assert nfe_heun == 8
    other_mask, _ = generate(random_run, onehot(torch.zeros_like(labels[:1])), [0], seed=3, steps=4)
    assert not torch.allclose(other_mask, a[:1], atol=1e-3)  # the mask steers the sample


# `bench train MODEL --preset tiny --steps 4 --out RUN`, `... --steps 6 --out RUN --resume`, then
# `bench sample RUN --steps 200 --n 2 --out DIR`, exactly as written, in an empty folder (default synthetic data).
@pytest.mark.parametrize("model", ["sisma", "dit", "sdm"])
def test_train_resume_sample_commands(tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    bench("train", model, "--preset", "tiny", "--steps", 4, "--out", "RUN")
    bench("train", model, "--preset", "tiny", "--steps", 6, "--out", "RUN", "--resume")
    bench("sample", "RUN", "--steps", 200, "--n", 2, "--out", "DIR")
    run, out = tmp_path / "RUN", tmp_path / "DIR"
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "grid.png"]
    assert Image.open(out / "00000.png").size == (16, 16)
    record = json.loads((out / "samples.json").read_text())
    assert (record["nfe"], record["steps"], record["method"], record["model"]) == (200, 200, "euler", model)
    assert record["train_step"] == 6 and record["provenance"]["nfe"] == 200
    config = json.loads((run / "config.json").read_text())
    assert config["steps"] == 6 and config["synthetic"] and Path(config["data"]).is_dir()
    assert [r.split(",")[0] for r in (run / "loss.csv").read_text().splitlines()[1:]] == [str(i) for i in range(1, 7)]
    assert (run / "checkpoints" / "last.pt").exists() and (run / "samples" / "step_0000006.png").exists()


def test_sample_options(data, tmp_path):
    """--data, --masks FOLDER (cycled), --method heun, --guidance, and a grid/masks/samples.json beside the PNGs."""
    run, out, masks = tmp_path / "run", tmp_path / "out", tmp_path / "masks"
    bench("train", "dit", "--preset", "tiny", "--data", data, "--steps", 2, "--grid-steps", 2, "--out", run)
    assert json.loads((run / "config.json").read_text())["data"] == str(Path(data).resolve())
    masks.mkdir()
    for k in range(2):
        label = np.zeros((32, 32), np.uint8)
        label[8 * k:16 + 8 * k, 8:24] = 1 + k
        write_label_png(label, masks / f"m{k}.png")
    bench("sample", run, "--steps", 3, "--n", 3, "--out", out, "--masks", masks, "--method", "heun",
          "--guidance", 2.0, "--batch-size", 2)
    record = json.loads((out / "samples.json").read_text())
    assert (record["nfe"], record["guidance"]) == (6, 2.0)
    assert [f["mask_source"] for f in record["files"]] == ["m0", "m1", "m0"]
    used = read_label_png(out / "masks" / "00002.png")
    assert used.shape == (16, 16) and set(np.unique(used)) == {0, 1}  # resized to the model's 16 px


def test_bad_run_folder_is_one_line_error(tmp_path):
    result = runner.invoke(app, ["sample", str(tmp_path), "--steps", "2", "--n", "1"])
    assert result.exit_code == 2
    assert "is not a training run" in result.output and "Traceback" not in result.output
    (tmp_path / "config.json").write_text(json.dumps({"model": "dit", "preset": "tiny"}))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["sample", str(tmp_path), "--steps", "2", "--n", "1"])
    assert result.exit_code == 2 and "cannot read checkpoint" in result.output
