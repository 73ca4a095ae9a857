"""The space the flow runs in: pixels (identity) or the latents of a diffusers AutoencoderKL."""
import pytest
import torch

from bench.autoencoder import SD_VAE_SCALE, LatentCache, PixelSpace, load_space
from bench.errors import BenchError

TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                block_out_channels=(8, 8, 8, 8), sample_size=16,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def make_tiny_vae(folder):
    """A randomly initialised AutoencoderKL with the SD VAE's geometry (4 channels, /8) saved as a folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**TINY_VAE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return make_tiny_vae(tmp_path_factory.mktemp("vae"))


def test_pixel_space_is_identity():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    space = PixelSpace()
    assert torch.equal(space.encode(x), x) and torch.equal(space.decode(x), x)
    assert space.decode(torch.full((1, 3, 2, 2), 3.0)).max() == 1  # samples are clamped to [-1, 1]


def test_latent_space_from_local_folder(vae_dir):
    from diffusers import AutoencoderKL

    space = load_space("latent", str(vae_dir))
    assert (space.channels, space.downsample, space.scale) == (4, 8, SD_VAE_SCALE)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    z = space.encode(images)
    assert z.shape == (2, 4, 2, 2)
    reference = AutoencoderKL.from_pretrained(vae_dir).encode(images).latent_dist.mean * SD_VAE_SCALE
    torch.testing.assert_close(z, reference)  # the posterior mean times the scale factor
    out = space.decode(z)
    assert out.shape == images.shape and out.abs().max() <= 1


def test_missing_vae_is_one_line_error(tmp_path):
    with pytest.raises(BenchError) as e:
        load_space("latent", "nobody-here/no-such-vae")  # a hub id not in the cache: no download is tried
    msg = str(e.value)
    assert "\n" not in msg and "--vae" in msg and "cache" in msg
    with pytest.raises(BenchError, match="does not exist"):
        load_space("latent", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError, match="not a diffusers AutoencoderKL folder"):
        load_space("latent", str(tmp_path / "empty"))


def test_latent_cache_reuses_latents(vae_dir, tmp_path):
    space = load_space("latent", str(vae_dir))
    cache = LatentCache(tmp_path, space, "train")
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    first = cache.encode(images, [5, 7, 9])
    assert sorted(p.name for p in cache.folder.iterdir()) == ["000005.pt", "000007.pt", "000009.pt"]
    # cached entries are read back, not re-encoded: garbage images give the stored latents
    again = cache.encode(torch.zeros_like(images), [7, 5, 9])
    torch.testing.assert_close(again, first[[1, 0, 2]])


def test_latent_training_and_sampling_end_to_end(vae_dir, tmp_path):
    """Train sisma/tiny in the latent space of a tiny random VAE for 2 steps, then sample decoded images."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from bench.cli import app
    from bench.synth import ensure_synthetic

    data = ensure_synthetic(tmp_path / "faces", n=24, size=32, seed=0, progress=False)
    run, out = tmp_path / "run", tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["train", "sisma", "--preset", "tiny", "--space", "latent", "--vae", str(vae_dir),
                                 "--data", str(data), "--steps", "2", "--grid-steps", "2", "--cache-latents",
                                 "--out", str(run)])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["model_overrides"] == {"space": "latent", "in_channels": 4, "input_size": 2}  # 16 px / 8
    assert len(list((run / "latents").glob("*/*.pt"))) == 8  # 2 steps x batch 4, each image encoded once
    result = runner.invoke(app, ["sample", str(run), "--steps", "3", "--n", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out / "00000.png").size == (16, 16)  # decoded back to pixels
    assert json.loads((out / "samples.json").read_text())["space"] == "latent"


def test_latent_runs_cache_latents_by_default(vae_dir, tmp_path):
    from bench.train import make_config

    latent = make_config("sisma", tmp_path / "a", preset="tiny", space="latent", vae=str(vae_dir))
    assert latent.cache_latents is True
    assert make_config("sisma", tmp_path / "b", preset="tiny", space="latent", vae=str(vae_dir),
                       cache_latents=False).cache_latents is False
    assert make_config("sisma", tmp_path / "c", preset="tiny").cache_latents is False  # pixels: nothing to cache
