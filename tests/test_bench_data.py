"""Benchmarks of the data path: synthetic faces per second, loader samples per second.

Run with ``pytest --benchmark-enable tests/test_bench_data.py``; the rates land in each benchmark's
``extra_info`` (``faces_per_s`` / ``samples_per_s``) and on stdout.
"""
from __future__ import annotations

import resource

import pytest
import torch

from bench.data import IMAGE_DIRNAME, FaceDataset, default_loader_workers
from bench.synth import default_workers, ensure_synthetic, generate_synthetic

GEN_FACES, GEN_SIZE = 100, 256
LOADER_FACES, BATCH = 64, 16


def _rate(benchmark, count: int, key: str) -> None:
    if benchmark.stats:                      # absent when benchmarks are disabled
        rate = count / benchmark.stats.stats.median
        benchmark.extra_info[key] = round(rate, 1)
        print(f"\n{benchmark.name}: {rate:.1f} {key.replace('_per_s', '')}/s")


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the generator's worker pool)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def test_generation_rate(benchmark, tmp_path):
    """Faces per second at 256 px with the default workers; also CPU time per face, which a busy
    machine distorts far less than wall-clock time (two idle cores give about 2 / cpu_s_per_face)."""
    root = tmp_path / "faces"
    rounds = 2
    start = _cpu_seconds()
    benchmark.pedantic(generate_synthetic, args=(root, GEN_FACES, GEN_SIZE, 0), kwargs={"progress": False},
                       rounds=rounds, iterations=1)
    benchmark.extra_info["workers"] = default_workers()
    if benchmark.stats:
        cpu = (_cpu_seconds() - start) / (rounds * GEN_FACES)
        benchmark.extra_info["cpu_ms_per_face"] = round(1e3 * cpu, 2)
        print(f"\n{benchmark.name}: {1e3 * cpu:.1f} ms CPU per face")
    _rate(benchmark, GEN_FACES, "faces_per_s")
    assert len(list((root / IMAGE_DIRNAME).glob("*.jpg"))) == GEN_FACES


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("bench") / "faces", LOADER_FACES, GEN_SIZE, 0, progress=False)


@pytest.mark.parametrize("size", [32, 256])
@pytest.mark.parametrize("workers", ["default", 0])
def test_loader_throughput(benchmark, faces, size, workers):
    """Samples per second through a DataLoader, merged label maps already cached (steady-state epochs)."""
    n_workers = default_loader_workers() if workers == "default" else workers
    ds = FaceDataset(faces, split="all", size=size, flip=True)
    for k in range(len(ds)):
        ds.label_map(k)                      # first epoch fills the cache; time the epochs after it
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=n_workers,
                                         persistent_workers=n_workers > 0)

    def epoch() -> int:
        return sum(batch["image"].shape[0] for batch in loader)

    seen = benchmark.pedantic(epoch, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["workers"] = n_workers
    _rate(benchmark, len(ds), "samples_per_s")
    assert seen == len(ds)
