"""The weight files the harness needs: where each is looked for, fetched once with a checked hash, offline by choice.

The registry (``REGISTRY``) names every file a run may need: the Inception network of FID/KID (torch-fidelity's
file), the AlexNet trunk of LPIPS (torchvision's file) and the SD-VAE of latent-space models (a Hugging Face hub
snapshot). For each it says what uses it, where it comes from and where it is looked for.

- Torch files (``WeightFile``) live in torch's hub cache, ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME``
  moves it), unless an explicit path is given. A file that is not there is fetched into that folder on first use:
  the bytes go to a temporary file beside it, their SHA-256 is compared with the published one as they arrive, and
  only a file with the right hash is renamed into place (``bench.io.atomic_write``), so an interrupted or failed
  transfer, or a wrong file, leaves nothing behind. A file already there is hashed before it is used.
- The SD-VAE (``HubSnapshot``) lives in the Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``) and is fetched by ``huggingface_hub.hf_hub_download``. The hub names every blob of
  its cache by the file's hash (SHA-256 for large files, the git blob SHA-1 for small ones); each blob is hashed
  against its name before use, and a blob that does not match is deleted.

Offline by choice: ``SIS_BENCH_OFFLINE=1``, ``HF_HUB_OFFLINE=1`` or ``set_offline()`` (what the commands'
``--offline`` does) turn every fetch off; a file that is not in its cache is then missing. A fetch that fails
(no network, server gone, transfer cut short) makes the file missing too, with the reason; callers record the
metric as missing (``WeightsMissing``), and the failure is remembered, so each file is tried at most once per
process. Opening a connection gives up after ``OPEN_TIMEOUT_S`` seconds (name lookup, connect, redirects,
headers), a transfer that stalls for ``STALL_TIMEOUT_S`` seconds fails, and nothing is retried.

``SIS_BENCH_WEIGHTS_URL`` replaces the host of the torch files' URLs (``<url>/<file name>``): for a mirror, and for
the tests, which serve files from 127.0.0.1. The hub's own ``HF_ENDPOINT`` does the same for the SD-VAE.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from bench.errors import BenchError
from bench.io import atomic_write, display_path, sha256_file

OFFLINE_ENV = ("SIS_BENCH_OFFLINE", "HF_HUB_OFFLINE")
URL_ENV = "SIS_BENCH_WEIGHTS_URL"  # a mirror's base URL for the torch files (and the tests' local server)
OPEN_TIMEOUT_S = 10.0  # name lookup, connect, redirects and response headers of one request, together
STALL_TIMEOUT_S = 30.0  # a transfer that receives nothing for this long fails
CHUNK = 1 << 20
LOCK_TIMEOUT_S = 3600  # another process fetching the same file: wait at most this long for it
GIT_SHA1 = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")


class WeightsMissing(BenchError):
    """A weight file is not where it was looked for and could not be fetched; the message says why and what to do."""


# --------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class WeightFile:
    """A published torch file: its hub-cache name, full SHA-256, URL, and the CLI option that overrides its path."""

    label: str
    filename: str
    sha256: str
    option: str
    url: str
    key: str = ""
    used_by: str = ""


@dataclass(frozen=True)
class HubSnapshot:
    """Files of a Hugging Face hub repository, fetched into the hub's cache (a diffusers model folder)."""

    label: str
    repo_id: str
    files: tuple[str, ...]
    option: str
    key: str = ""
    used_by: str = ""


INCEPTION = WeightFile(
    key="inception",
    label="Inception-v3 (FID/KID)",
    used_by="FID and KID (bench quality, bench run)",
    filename="weights-inception-2015-12-05-6726825d.pth",
    sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    option="--inception-weights",
    url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
)
ALEXNET = WeightFile(
    key="alexnet",
    label="AlexNet (LPIPS)",
    used_by="LPIPS diversity (bench quality, bench run)",
    filename="alexnet-owt-7be5be79.pth",
    sha256="7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",
    option="--alexnet-weights",
    url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
)
SD_VAE = HubSnapshot(
    key="sd-vae",
    label="SD-VAE stabilityai/sd-vae-ft-mse",
    used_by="latent-space models (bench train, bench run, bench sample, bench quality), decode timing (bench speed)",
    repo_id="stabilityai/sd-vae-ft-mse",
    files=("config.json", "diffusion_pytorch_model.safetensors"),
    option="--vae",
)
REGISTRY: dict[str, Union[WeightFile, HubSnapshot]] = {w.key: w for w in (INCEPTION, ALEXNET, SD_VAE)}


# --------------------------------------------------------------------------- offline, and failures remembered
_state = {"offline": False}
_failed: dict[str, BenchError] = {}  # what was tried and failed in this process -> the error it ended in
_verified: set[tuple] = set()  # (path, size, mtime) of files whose hash was checked in this process


def set_offline(offline: bool = True) -> None:
    """Turn fetching off (or back on) for this process, as ``--offline`` does; the environment can still turn it off."""
    _state["offline"] = bool(offline)


def offline_reason() -> str:
    """Why fetching is off ('' when it is on): ``--offline`` or the environment variable that says so."""
    if _state["offline"]:
        return "--offline"
    for name in OFFLINE_ENV:
        if env_switch(name):
            return f"{name}={os.environ[name]}"
    return ""


SWITCH_ON = ("1", "true", "yes", "on")
SWITCH_OFF = ("", "0", "false", "no", "off")


def env_switch(name: str) -> bool:
    """An on/off environment variable, parsed strictly: 1/true/yes/on or 0/false/no/off (or unset); anything else
    is a one-line error, never a guess."""
    value = os.environ.get(name, "").strip().lower()
    if value in SWITCH_ON:
        return True
    if value in SWITCH_OFF:
        return False
    raise BenchError(f"{name}={os.environ[name]!r} is not a switch: set it to 1, true, yes or on (or 0, false, no, "
                     f"off), or unset it")


def _remembered(key: str) -> BenchError:
    """A fresh copy of the error an earlier try of ``key`` ended in (this process does not try it again)."""
    return type(_failed[key])(str(_failed[key]))


def reset() -> None:
    """Forget the offline choice, the failed fetches and the hashes checked (tests; a long-lived process)."""
    _state["offline"] = False
    _failed.clear()
    _verified.clear()


# --------------------------------------------------------------------------- hashes and places
def hub_checkpoint_dir() -> Path:
    """torch's hub cache folder for checkpoints (honours $TORCH_HOME)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now: $HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/..."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface" / "hub"


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file's contents (how the hub names the blob of a small file)."""
    h = hashlib.sha1()
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def source_url(spec: WeightFile) -> str:
    """Where ``spec`` is fetched from: its published URL, or ``$SIS_BENCH_WEIGHTS_URL/<file name>``."""
    base = os.environ.get(URL_ENV, "").strip()
    return f"{base.rstrip('/')}/{spec.filename}" if base else spec.url


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "no details"
    return f"{type(e).__name__}: {text[:200]}"


def _how_to_supply(spec: WeightFile) -> str:
    return f"run `bench weights fetch` where there is internet, or pass {spec.option} FILE"


def check_file(spec: WeightFile, path: Path, explicit: bool = False) -> Path:
    """``path`` if its SHA-256 is ``spec``'s; a one-line error naming the file otherwise (the file is kept)."""
    stamp = _stamp(path)
    if stamp in _verified:
        return path
    digest = sha256_file(path)
    if digest != spec.sha256:
        fix = (f"pass {spec.option} with {spec.filename} from {spec.url}" if explicit else
               f"delete it (it is fetched again on first use) or pass {spec.option} with the right file")
        raise BenchError(f"{display_path(path)} has SHA-256 {digest[:16]}..., not the {spec.label} weights "
                         f"({spec.sha256[:16]}...); {fix}")
    _verified.add(stamp)
    return path


# --------------------------------------------------------------------------- torch files
def resolve(spec: WeightFile, explicit: Optional[Union[Path, str]] = None, progress: bool = True) -> Path:
    """Path of ``spec``'s file after checking its SHA-256: ``explicit``, or the hub cache, fetched there if absent.

    An ``explicit`` path that does not exist is missing (never fetched); one with the wrong hash is an error.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsMissing(
                f"{spec.label} weights not found at {display_path(path)} ({spec.option}); give the path of "
                f"{spec.filename}, or leave {spec.option} out to use (and fill) {display_path(hub_checkpoint_dir())}")
        return check_file(spec, path, explicit=True)
    return fetch(spec, hub_checkpoint_dir(), progress=progress)


def fetch(spec: WeightFile, folder: Path, progress: bool = True) -> Path:
    """``folder/<file name>``, fetched first if absent: verified before it is renamed into place.

    Raises ``WeightsMissing`` (with the reason) when fetching is off or fails, and remembers a failure so that the
    same file is not tried again in this process; a file whose hash is wrong is deleted and is an error.
    """
    from filelock import FileLock, Timeout

    folder = Path(folder)
    target = folder / spec.filename
    if target.is_file():
        return check_file(spec, target)
    url = source_url(spec)
    why = offline_reason()
    if why:
        raise WeightsMissing(f"{spec.label} weights not found at {display_path(target)} and downloads are off "
                             f"({why}); {_how_to_supply(spec)}")
    if url in _failed:
        raise _remembered(url)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / f".{spec.filename}.lock"  # one process fetches, the others wait and find the file
    try:
        with FileLock(str(lock), timeout=LOCK_TIMEOUT_S):
            if target.is_file():  # another process fetched it while we waited for the lock
                return check_file(spec, target)
            for stale in folder.glob(f".{spec.filename}.*.tmp"):  # left by a killed fetch; we hold the lock
                with contextlib.suppress(OSError):
                    stale.unlink()
            download(url, target, spec.sha256, spec.label, progress)
    except (OSError, http.client.HTTPException, ValueError, Timeout) as e:  # no network, cut short, bad URL
        _failed[url] = WeightsMissing(f"{spec.label} weights not found at {display_path(target)}, and fetching "
                                      f"{url} failed ({_one_line(e)}); {_how_to_supply(spec)}")
        raise _failed[url] from None
    except HashMismatch as e:  # an error, not a missing metric: the server (or a mirror) has another file
        _failed[url] = BenchError(f"{e}; {_how_to_supply(spec)}")
        raise _failed[url] from None
    finally:
        # The lock only saves a second download (renames are atomic and every copy is verified), so its empty
        # file need not outlive the fetch.
        with contextlib.suppress(OSError):
            lock.unlink()
    _verified.add(_stamp(target))
    return target


class HashMismatch(Exception):
    """The bytes a server sent are not the published file."""


class TransferCut(OSError):
    """The connection ended before the announced length arrived."""


def open_url(url: str, timeout: Optional[float] = None):
    """The response to a GET of ``url``, or an error within ``timeout`` (default OPEN_TIMEOUT_S) seconds.

    The request runs in a helper thread so that a name lookup that hangs (which socket timeouts do not cover) cannot
    hold the caller; urllib follows a bounded number of redirects and honours the *_proxy variables.
    """
    timeout = OPEN_TIMEOUT_S if timeout is None else timeout
    result: dict = {}

    def request() -> None:
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "sis-bench"})
            result["response"] = urllib.request.urlopen(req, timeout=min(timeout, STALL_TIMEOUT_S))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = e

    worker = threading.Thread(target=request, name="sis-bench-fetch", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s")
    if "error" in result:
        raise result["error"]
    response = result["response"]
    with contextlib.suppress(AttributeError, OSError):  # reads may wait longer than the opening did
        response.fp.raw._sock.settimeout(STALL_TIMEOUT_S)
    return response


def download(url: str, target: Path, sha256: str, label: str = "", progress: bool = True) -> Path:
    """Stream ``url`` into a temporary file beside ``target``, hashing as it arrives; renamed into place only when
    the whole announced length came and its SHA-256 is ``sha256``. Nothing is left behind otherwise."""
    from tqdm import tqdm

    with contextlib.closing(open_url(url)) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None

        def write(f) -> None:
            h, received = hashlib.sha256(), 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"fetching {target.name}",
                      disable=not progress) as bar:
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    h.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise TransferCut(f"transfer cut short: {received} of {total} bytes")
            if h.hexdigest() != sha256:
                raise HashMismatch(f"{url} sent a file with SHA-256 {h.hexdigest()[:16]}..., not the "
                                   f"{label or target.name} ({sha256[:16]}...); it was deleted")

        return atomic_write(target, write)


# --------------------------------------------------------------------------- hub snapshots (the SD-VAE)
def _blob_ok(path: Path) -> Optional[bool]:
    """Whether a hub-cache file matches the hash its blob is named by; None when the name is not a hash."""
    blob = Path(os.path.realpath(path))
    name = blob.name
    stamp = _stamp(blob)
    if stamp in _verified:
        return True
    if SHA256.fullmatch(name):
        ok = sha256_file(blob) == name
    elif GIT_SHA1.fullmatch(name):
        ok = git_blob_sha1(blob) == name
    else:
        return None
    if ok:
        _verified.add(stamp)
    return ok


def cached_snapshot(spec: HubSnapshot, cache: Optional[Path] = None) -> Optional[Path]:
    """The snapshot folder holding every file of ``spec`` in the hub cache (the newest ``main``), or None."""
    from huggingface_hub import try_to_load_from_cache

    cache = cache or hf_cache_dir()
    paths = []
    for name in spec.files:
        found = try_to_load_from_cache(spec.repo_id, name, cache_dir=str(cache))
        if not isinstance(found, str) or not Path(found).is_file():
            return None
        paths.append(Path(found))
    folders = {p.parent for p in paths}
    return folders.pop() if len(folders) == 1 else None


def hub_repo_dir(spec: HubSnapshot, cache: Optional[Path] = None) -> Path:
    """Where the hub cache keeps ``spec``'s repository."""
    return (cache or hf_cache_dir()) / ("models--" + spec.repo_id.replace("/", "--"))


def _check_snapshot(spec: HubSnapshot, folder: Path, delete: bool) -> Path:
    """``folder`` when each of its files matches the hash its blob is named by; a one-line error otherwise (the
    blob deleted when ``delete``: one this call fetched)."""
    for name in spec.files:
        if _blob_ok(folder / name) is False:
            blob = Path(os.path.realpath(folder / name))
            if delete:
                for p in (blob, folder / name):
                    with contextlib.suppress(OSError):
                        p.unlink()
                fix = "it was deleted; fetch it again (bench weights fetch)"
            else:
                fix = f"delete {display_path(blob)} and fetch it again (bench weights fetch)"
            raise BenchError(f"{display_path(folder / name)} of {spec.repo_id} does not match the hash the hub "
                             f"names it by: {fix}, or pass {spec.option} FOLDER")
    return folder


def hub_snapshot_for(repo_id: str) -> HubSnapshot:
    """The registered snapshot of ``repo_id``, or a diffusers AutoencoderKL folder of that repository."""
    for w in REGISTRY.values():
        if isinstance(w, HubSnapshot) and w.repo_id == repo_id:
            return w
    return HubSnapshot(label=f"VAE {repo_id}", repo_id=repo_id, files=SD_VAE.files, option="--vae", key=repo_id)


def resolve_snapshot(spec: HubSnapshot, cache: Optional[Path] = None) -> Path:
    """A local folder with ``spec``'s files, hash-checked: from the hub cache, fetched there first if absent.

    Raises ``WeightsMissing`` (with the reason) when fetching is off or fails (remembered for this process)."""
    cache = Path(cache or hf_cache_dir())
    folder = cached_snapshot(spec, cache)
    if folder is not None:
        return _check_snapshot(spec, folder, delete=False)
    where = display_path(hub_repo_dir(spec, cache))
    registered = any(isinstance(w, HubSnapshot) and w.repo_id == spec.repo_id for w in REGISTRY.values())
    supply = (f"run {'`bench weights fetch`' if registered else f'`huggingface-cli download {spec.repo_id}`'} "
              f"where there is internet, or copy the diffusers folder ({' + '.join(spec.files)}) to this machine "
              f"and pass {spec.option} FOLDER")
    why = offline_reason()
    if why:
        raise WeightsMissing(f"{spec.label} is not in the Hugging Face cache ({where}) and downloads are off "
                             f"({why}); {supply}")
    key = f"hub:{spec.repo_id}:{cache}"
    if key in _failed:
        raise _remembered(key)
    try:
        folder = _hub_download(spec, cache)
    except Exception as e:  # noqa: BLE001 - whatever the hub client raises, the weights are missing
        _failed[key] = WeightsMissing(f"{spec.label} is not in the Hugging Face cache ({where}), and fetching it "
                                      f"from the hub failed ({_one_line(e)}); {supply}")
        raise _failed[key] from None
    return _check_snapshot(spec, folder, delete=True)


def _hub_download(spec: HubSnapshot, cache: Path) -> Path:
    """Fetch ``spec``'s files with huggingface_hub: one quick probe first (no retries), then the files."""
    import warnings

    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now, not when huggingface_hub was imported
    probe: dict = {}

    def ask() -> None:
        try:
            url = hf_hub_url(spec.repo_id, spec.files[0], endpoint=endpoint)
            probe["meta"] = get_hf_file_metadata(url, timeout=OPEN_TIMEOUT_S, endpoint=endpoint)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            probe["error"] = e

    worker = threading.Thread(target=ask, name="sis-bench-hub-probe", daemon=True)
    worker.start()
    worker.join(OPEN_TIMEOUT_S)
    if worker.is_alive():
        raise TimeoutError(f"no answer from the hub within {OPEN_TIMEOUT_S:g} s")
    if "error" in probe:
        raise probe["error"]
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in spec.files:
            paths.append(Path(hf_hub_download(spec.repo_id, name, cache_dir=str(cache), endpoint=endpoint,
                                              etag_timeout=OPEN_TIMEOUT_S)))  # with the hub's progress bar
    return paths[0].parent


# --------------------------------------------------------------------------- bench weights list | fetch
def inventory() -> list[dict]:
    """One record per registered file: what uses it, where it was looked for, present, size, hash ok."""
    rows = []
    for w in REGISTRY.values():
        if isinstance(w, WeightFile):
            path = hub_checkpoint_dir() / w.filename
            present = path.is_file()
            size = path.stat().st_size if present else None
            ok = (sha256_file(path) == w.sha256) if present else None
            files = [path]
        else:
            folder = cached_snapshot(w)
            present = folder is not None
            path = folder if present else hub_repo_dir(w)
            files = [folder / f for f in w.files] if present else []
            size = sum(Path(os.path.realpath(f)).stat().st_size for f in files) if present else None
            checks = [_blob_ok(f) for f in files]
            ok = None if not present or None in checks else all(checks)
        rows.append({"name": w.key, "file": w.filename if isinstance(w, WeightFile) else w.repo_id,
                     "used by": w.used_by, "looked for at": display_path(path), "present": present,
                     "size": size, "hash ok": ok, "source": source_url(w) if isinstance(w, WeightFile) else
                     f"Hugging Face hub {w.repo_id}: {', '.join(w.files)}"})
    return rows


def _size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def inventory_text() -> str:
    """``bench weights list``: a Markdown table of ``inventory()`` and a line on fetching."""
    rows = inventory()
    lines = ["| name | file | used by | looked for at | present | size | hash ok |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = {True: "yes", False: "NO (wrong file)", None: "-"}[r["hash ok"]]
        lines.append(f"| {r['name']} | {r['file']} | {r['used by']} | {r['looked for at']} | "
                     f"{'yes' if r['present'] else 'no'} | {_size(r['size'])} | {ok} |")
    why = offline_reason()
    lines += ["", f"downloads are off ({why}): a missing file stays missing" if why else
              "a missing file is fetched on first use (or now: bench weights fetch); --offline or "
              "SIS_BENCH_OFFLINE=1 turns that off"]
    return "\n".join(lines)


def fetch_all(names: Optional[list[str]] = None, dest: Optional[Path] = None,
              echo: Callable[[str], None] = print) -> list[Path]:
    """``bench weights fetch``: every registered file (or ``names``) into the standard caches, or into ``dest``
    (``dest/torch/hub/checkpoints`` and ``dest/huggingface/hub``, what TORCH_HOME=dest/torch and
    HF_HUB_CACHE=dest/huggingface/hub point to on machines without internet). One-line error if any fails."""
    names = list(names or REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise BenchError(f"unknown weights {unknown[0]!r}; use any of {', '.join(REGISTRY)} (bench weights list)")
    why = offline_reason()
    if why:
        raise BenchError(f"downloads are off ({why}); unset it (or drop --offline) to fetch")
    torch_dir = Path(dest) / "torch" / "hub" / "checkpoints" if dest else hub_checkpoint_dir()
    hf_dir = Path(dest) / "huggingface" / "hub" if dest else hf_cache_dir()
    done, failed = [], []
    for name in names:
        w = REGISTRY[name]
        try:
            path = fetch(w, torch_dir) if isinstance(w, WeightFile) else resolve_snapshot(w, hf_dir)
        except WeightsMissing as e:
            failed.append(name)
            echo(f"{name}: failed: {e}")
            continue
        done.append(path)
        echo(f"{name}: ok, {display_path(path)}")
    if dest:
        echo(f"where these files are to be used: export TORCH_HOME={display_path(Path(dest) / 'torch')} "
             f"HF_HUB_CACHE={display_path(hf_dir)}")
    if failed:
        raise BenchError(f"could not fetch {', '.join(failed)} (reasons above); check the network, or fetch on a "
                         f"machine with internet with --dest DIR and copy DIR here")
    return done
