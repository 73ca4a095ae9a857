"""bench.weights: fetching on first use from a local HTTP server on 127.0.0.1 (right hash, wrong hash, a transfer cut
short, a server gone or silent), offline by choice, failures remembered, the hub cache's hash checks, and
`bench weights list | fetch`."""
import dataclasses
import hashlib
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from typer.testing import CliRunner

from bench import weights
from bench.cli import app
from bench.errors import BenchError

BODY = bytes(range(256)) * 4096  # 1 MiB: more than one read chunk
SPEC = weights.WeightFile(label="Test weights", filename="test-weights-0123abcd.pth",
                          sha256=hashlib.sha256(BODY).hexdigest(), option="--test-weights",
                          url="https://example.invalid/test-weights.pth", key="test", used_by="the tests")
FAST_S = 3.0  # a failed fetch must come back well within this


class Handler(BaseHTTPRequestHandler):
    """Serves ``server.routes``: path -> (body, mode); mode 'cut' announces the whole length and sends half."""

    def do_GET(self):
        self.server.hits.append(self.path)
        if self.path not in self.server.routes:
            self.send_error(404)
            return
        body, mode = self.server.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode == "cut" else body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A file server on 127.0.0.1 (a free port), stopped after the test."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.routes, httpd.hits = {}, []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def _serve(server, monkeypatch, filename, body, mode="ok"):
    """Downloads on, the torch files' URLs pointed at ``server``, which serves ``body`` as ``filename``."""
    monkeypatch.delenv("SIS_BENCH_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(weights.URL_ENV, f"http://127.0.0.1:{server.server_port}/files")
    server.routes[f"/files/{filename}"] = (body, mode)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leftovers(folder):
    """Everything in ``folder``, hidden files (temporary, lock) included."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """An empty torch hub cache and an empty Hugging Face cache."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch" / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "torch" / "hub" / "checkpoints"


# --------------------------------------------------------------------------- torch files from the local server
def test_a_file_with_the_right_hash_is_fetched_once_into_the_cache(server, monkeypatch, empty_caches):
    _serve(server, monkeypatch, SPEC.filename, BODY)
    path = weights.resolve(SPEC)
    assert path == empty_caches / SPEC.filename and path.read_bytes() == BODY
    assert _leftovers(empty_caches) == [SPEC.filename]  # no temporary file left beside it
    assert weights.resolve(SPEC) == path and len(server.hits) == 1  # the second use reads the cache


def test_a_file_with_the_wrong_hash_is_deleted_and_an_error(server, monkeypatch, empty_caches):
    _serve(server, monkeypatch, SPEC.filename, b"something else entirely")
    with pytest.raises(BenchError) as e:
        weights.resolve(SPEC)
    assert not isinstance(e.value, weights.WeightsMissing)
    msg = str(e.value)
    assert "\n" not in msg and "SHA-256" in msg and "deleted" in msg and SPEC.option in msg
    assert _leftovers(empty_caches) == []
    with pytest.raises(BenchError) as again:  # remembered: the same error, no second transfer
        weights.resolve(SPEC)
    assert str(again.value) == msg and not isinstance(again.value, weights.WeightsMissing) and len(server.hits) == 1


def test_a_transfer_cut_short_leaves_nothing_and_the_file_missing(server, monkeypatch, empty_caches):
    _serve(server, monkeypatch, SPEC.filename, BODY, mode="cut")
    with pytest.raises(weights.WeightsMissing) as e:
        weights.resolve(SPEC)
    msg = str(e.value)
    assert "\n" not in msg and "cut short" in msg and SPEC.option in msg and "bench weights fetch" in msg
    assert _leftovers(empty_caches) == []


def test_a_server_gone_is_missing_fast_and_tried_once(monkeypatch, empty_caches):
    monkeypatch.delenv("SIS_BENCH_OFFLINE", raising=False)
    monkeypatch.setenv(weights.URL_ENV, f"http://127.0.0.1:{_dead_port()}")
    opened = []
    real_open = weights.open_url
    monkeypatch.setattr(weights, "open_url", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    tic = time.perf_counter()
    for _ in range(5):  # e.g. one call per image or per run: only the first one tries the network
        with pytest.raises(weights.WeightsMissing) as e:
            weights.resolve(SPEC)
    assert time.perf_counter() - tic < FAST_S
    assert len(opened) == 1
    msg = str(e.value)
    assert "\n" not in msg and str(empty_caches / SPEC.filename) in msg and "refused" in msg.lower()
    assert _leftovers(empty_caches) == []


def test_a_server_that_never_answers_times_out(monkeypatch, empty_caches):
    monkeypatch.delenv("SIS_BENCH_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "OPEN_TIMEOUT_S", 0.5)
    with socket.socket() as silent:  # accepts connections (the kernel does) and never says anything
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        monkeypatch.setenv(weights.URL_ENV, f"http://127.0.0.1:{silent.getsockname()[1]}")
        tic = time.perf_counter()
        with pytest.raises(weights.WeightsMissing, match="timed out|no answer"):
            weights.resolve(SPEC)
        assert time.perf_counter() - tic < FAST_S


def test_offline_by_choice_makes_no_request(server, monkeypatch, empty_caches):
    _serve(server, monkeypatch, SPEC.filename, BODY)
    for off in (lambda: monkeypatch.setenv("SIS_BENCH_OFFLINE", "1"), lambda: monkeypatch.setenv("HF_HUB_OFFLINE", "1"),
                lambda: weights.set_offline(True)):
        weights.reset()
        monkeypatch.delenv("SIS_BENCH_OFFLINE", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        off()
        with pytest.raises(weights.WeightsMissing, match=r"downloads are off \((SIS_BENCH_OFFLINE=1|HF_HUB_OFFLINE=1|"
                                                         r"--offline)\)"):
            weights.resolve(SPEC)
    assert server.hits == [] and _leftovers(empty_caches) == []


def test_an_explicit_path_is_never_fetched(server, monkeypatch, empty_caches, tmp_path):
    _serve(server, monkeypatch, SPEC.filename, BODY)
    with pytest.raises(weights.WeightsMissing, match="--test-weights"):
        weights.resolve(SPEC, tmp_path / "nowhere.pth")
    assert server.hits == []


def test_a_cached_file_with_the_wrong_hash_is_an_error_and_kept(server, monkeypatch, empty_caches):
    _serve(server, monkeypatch, SPEC.filename, BODY)
    empty_caches.mkdir(parents=True)
    (empty_caches / SPEC.filename).write_bytes(b"stale")
    with pytest.raises(BenchError, match="delete it") as e:
        weights.resolve(SPEC)
    assert not isinstance(e.value, weights.WeightsMissing)
    assert (empty_caches / SPEC.filename).read_bytes() == b"stale" and server.hits == []


# --------------------------------------------------------------------------- the hub cache (SD-VAE)
def _fake_hub_cache(cache, repo_id, folder, revision="0" * 40):
    """``folder``'s files in the hub cache's layout: blobs named by SHA-256 (large) or git SHA-1 (small)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        blob = weights.git_blob_sha1(f) if f.suffix == ".json" else weights.sha256_file(f)
        (repo / "blobs").mkdir(exist_ok=True)
        shutil.copy(f, repo / "blobs" / blob)
        (snap / f.name).symlink_to(f"../../blobs/{blob}")
    return snap


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from test_autoencoder import make_tiny_vae

    return make_tiny_vae(tmp_path_factory.mktemp("tiny-vae"))


def test_a_hub_id_loads_from_the_cache_after_its_hashes_are_checked(tiny_vae, empty_caches, tmp_path, monkeypatch):
    from bench.autoencoder import load_space

    snap = _fake_hub_cache(tmp_path / "hf", "someone/tiny-vae", tiny_vae)
    space = load_space("latent", "someone/tiny-vae")  # offline (conftest): the cache alone serves it
    assert space.channels == 4
    monkeypatch.setitem(weights.REGISTRY, "sd-vae", dataclasses.replace(weights.SD_VAE, repo_id="someone/tiny-vae"))
    row = next(r for r in weights.inventory() if r["name"] == "sd-vae")
    assert row["present"] and row["hash ok"] is True and row["size"] > 0

    blob = (snap / "diffusion_pytorch_model.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")  # one byte changed
    weights.reset()
    with pytest.raises(BenchError, match="does not match the hash") as e:
        load_space("latent", "someone/tiny-vae")
    assert not isinstance(e.value, weights.WeightsMissing) and blob.exists()  # a file we did not fetch is kept
    assert next(r for r in weights.inventory() if r["name"] == "sd-vae")["hash ok"] is False


def test_a_hub_that_cannot_be_reached_is_missing_fast_and_tried_once(empty_caches, monkeypatch):
    from bench.autoencoder import load_vae

    monkeypatch.delenv("SIS_BENCH_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_dead_port()}")
    tic = time.perf_counter()
    with pytest.raises(weights.WeightsMissing) as e:
        load_vae(weights.SD_VAE.repo_id)
    assert time.perf_counter() - tic < FAST_S
    msg = str(e.value)
    assert "\n" not in msg and "--vae" in msg and "fetching it from the hub failed" in msg
    monkeypatch.setattr(weights, "_hub_download", lambda *a: pytest.fail("tried the hub again"))
    with pytest.raises(weights.WeightsMissing):
        load_vae(weights.SD_VAE.repo_id)


# --------------------------------------------------------------------------- bench weights list | fetch
def _bench(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def test_weights_list_shows_each_file_missing_with_where_it_was_looked_for(empty_caches, tmp_path):
    result = _bench("weights", "list")
    assert result.exit_code == 0, result.output
    lines = {line.split("|")[1].strip(): line for line in result.output.splitlines() if line.startswith("| ")}
    for name, where in (("inception", empty_caches / weights.INCEPTION.filename),
                        ("alexnet", empty_caches / weights.ALEXNET.filename),
                        ("sd-vae", tmp_path / "hf" / "models--stabilityai--sd-vae-ft-mse")):
        cells = [c.strip() for c in lines[name].split("|")]
        assert str(where) in cells and cells[5] == "no", lines[name]
    assert "downloads are off (SIS_BENCH_OFFLINE=1)" in result.output


def test_weights_fetch_dest_fills_a_folder_for_machines_without_internet(server, monkeypatch, empty_caches, tmp_path):
    inception, alexnet = b"inception stand-in" * 1000, b"alexnet stand-in" * 1000
    for key, body in (("inception", inception), ("alexnet", alexnet)):
        spec = dataclasses.replace(weights.REGISTRY[key], sha256=hashlib.sha256(body).hexdigest())
        monkeypatch.setitem(weights.REGISTRY, key, spec)
        _serve(server, monkeypatch, spec.filename, body)
    dest = tmp_path / "prefetched"
    result = _bench("weights", "fetch", "inception", "alexnet", "--dest", dest)
    assert result.exit_code == 0, result.output
    folder = dest / "torch" / "hub" / "checkpoints"
    assert (folder / weights.INCEPTION.filename).read_bytes() == inception
    assert (folder / weights.ALEXNET.filename).read_bytes() == alexnet
    assert _leftovers(folder) == sorted([weights.INCEPTION.filename, weights.ALEXNET.filename])
    assert f"TORCH_HOME={dest / 'torch'}" in result.output and _leftovers(empty_caches) == []

    # Where TORCH_HOME points at that folder, the files are found with no network.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(dest / "torch" / "hub"))
    monkeypatch.setenv("SIS_BENCH_OFFLINE", "1")
    assert weights.resolve(weights.REGISTRY["alexnet"]) == folder / weights.ALEXNET.filename


def test_weights_fetch_that_fails_ends_in_one_error_line(monkeypatch, empty_caches):
    monkeypatch.delenv("SIS_BENCH_OFFLINE", raising=False)
    monkeypatch.setenv(weights.URL_ENV, f"http://127.0.0.1:{_dead_port()}")
    tic = time.perf_counter()
    result = _bench("weights", "fetch", "inception", "alexnet")
    assert time.perf_counter() - tic < FAST_S
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: could not fetch inception, alexnet")
    assert _bench("weights", "fetch", "nothing").output.startswith("error: unknown weights 'nothing'")
    monkeypatch.setenv("SIS_BENCH_OFFLINE", "1")
    assert "downloads are off" in _bench("weights", "fetch").output


@pytest.mark.parametrize("command", ["quality", "run", "train", "sample", "speed"])
def test_every_command_that_may_fetch_has_an_offline_flag(command):
    result = _bench(command, "--help")
    assert result.exit_code == 0 and "--offline" in result.output
