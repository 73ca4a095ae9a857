"""The trainer: deterministic data order, exact resume, DDP equivalence, NaN stop, signals, precisions."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import flow
from bench.checkpoint import load
from bench.errors import BenchError
from bench.provenance import machine_name
from bench.synth import ensure_synthetic
from bench.train import StepBatchSampler, draw_noise, make_config, train

# Resumed and multi-process runs must match the reference run to this tolerance (CPU, fp32). Resume is
# bit-exact in practice; DDP sums gradients in a different order, hence a small absolute slack.
RESUME_TOL = dict(rtol=1e-6, atol=1e-7)
DDP_TOL = dict(rtol=1e-4, atol=1e-5)
BENCH = shutil.which("bench") or str(Path(sys.executable).with_name("bench"))


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small synthetic set at 32 px (tiny models train at 16 px): 22 train, 2 test faces."""
    return ensure_synthetic(tmp_path_factory.mktemp("faces"), n=24, size=32, seed=0, progress=False)


def tiny(run_dir, data, model="dit", resume=False, **options):
    """A tiny-preset config; grids are cheap (2 Euler steps) and only written at the last step."""
    if resume:
        return make_config(model, run_dir, resume=True, **options)
    defaults = {"grid_steps": 2, "grid_masks": 1, "sample_every": 1000}
    return make_config(model, run_dir, preset="tiny", data=str(data), **{**defaults, **options})


def states(run_dir):
    return load(Path(run_dir) / "checkpoints" / "last.pt")


def loss_rows(run_dir):
    with open(Path(run_dir) / "loss.csv") as f:
        return list(csv.DictReader(f))


def test_data_order_is_a_function_of_step():
    full = StepBatchSampler(10, 4, seed=3, start=0, stop=8)
    batches = list(full)
    epoch0 = [i for b in batches for i in b][:10]
    assert sorted(epoch0) == list(range(10))  # each epoch is a permutation
    assert list(StepBatchSampler(10, 4, seed=3, start=5, stop=8)) == batches[5:]  # resumable from any step
    ranks = [list(StepBatchSampler(10, 4, seed=3, start=0, stop=8, rank=r, world=2)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == batches  # ranks take their slices of the same global batch
    assert list(StepBatchSampler(10, 4, seed=4, start=0, stop=8)) != batches


def test_noise_slices_match_the_global_batch(data, tmp_path):
    cfg = tiny(tmp_path / "run", data, batch_size=4)
    whole = draw_noise(torch.Generator().manual_seed(0), cfg, (3, 16, 16), rank=0, world=1)
    halves = [draw_noise(torch.Generator().manual_seed(0), cfg, (3, 16, 16), rank=r, world=2) for r in range(2)]
    for k in range(3):
        assert torch.equal(torch.cat([halves[0][k], halves[1][k]]), whole[k])


def test_resume_continues_exactly(data, tmp_path):
    """4 steps in one go == 2 steps, then --resume to 4 (also: a finished run extended by a larger --steps)."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny(a, data, steps=4), a, progress=False)
    train(tiny(b, data, steps=2), b, progress=False)
    assert states(b)["step"] == 2
    train(tiny(b, data, resume=True, model="dit", steps=4), b, resume=True, progress=False)
    sa, sb = states(a), states(b)
    assert sa["step"] == sb["step"] == 4
    for part in ("model", "ema"):
        for name in sa[part]:
            torch.testing.assert_close(sb[part][name], sa[part][name], **RESUME_TOL, msg=f"{part}.{name}")
    for k, v in sa["optimizer"]["state"].items():
        torch.testing.assert_close(sb["optimizer"]["state"][k]["exp_avg_sq"], v["exp_avg_sq"], **RESUME_TOL)
    assert [r["loss"] for r in loss_rows(a)] == [r["loss"] for r in loss_rows(b)]
    assert {r["threads"] for r in loss_rows(b)} == {str(torch.get_num_threads())}  # the speed's context
    assert {r["machine"] for r in loss_rows(b)} == {machine_name("cpu")} != {""}  # the times' machine
    assert (b / "samples" / "step_0000002.png").exists() and (b / "samples" / "step_0000004.png").exists()


def test_config_checks(data, tmp_path):
    run = tmp_path / "run"
    train(tiny(run, data, steps=1), run, progress=False)
    with pytest.raises(BenchError, match="already holds a run"):
        tiny(run, data)
    with pytest.raises(BenchError, match=r"lr = 0\.5 differs"):
        tiny(run, data, resume=True, preset="tiny", lr=0.5)
    with pytest.raises(BenchError, match="model = 'sisma' differs"):
        tiny(run, data, resume=True, model="sisma")
    with pytest.raises(BenchError, match="holds no run"):
        tiny(tmp_path / "nothing", data, resume=True)
    with pytest.raises(BenchError, match="precision"):
        tiny(tmp_path / "new", data, precision="fp8")
    with pytest.raises(BenchError, match="sdm has no latent-space variant"):
        make_config("sdm", tmp_path / "latent", preset="tiny", space="latent", vae="unused")
    cfg = tiny(run, data, resume=True, steps=1)  # same steps: nothing to do
    assert train(cfg, run, resume=True, progress=False)["loss"] is None


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real, calls = flow.flow_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(flow, "flow_loss", poisoned)
    with pytest.raises(BenchError, match="loss is nan at step 5") as e:
        train(tiny(run, data, steps=8, ckpt_every=2), run, progress=False)
    assert "last good checkpoint" in str(e.value) and "(step 4)" in str(e.value)
    state = states(run)
    assert state["step"] == 4  # the bad step is not saved
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert len(loss_rows(run)) == 4


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(data, tmp_path, precision):
    run = tmp_path / "run"
    result = train(tiny(run, data, steps=1, precision=precision), run, progress=False)
    assert torch.isfinite(torch.tensor(result["loss"]))
    scaler = states(run)["scaler"]
    assert ("scale" in scaler) == (precision == "fp16")  # the grad scaler is on for fp16 only


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env


def test_ddp_two_processes_match_one(data, tmp_path):
    """Global batch 4 over two gloo processes (2 each) follows the single-process run to DDP_TOL."""
    one, two = tmp_path / "one", tmp_path / "two"
    options = ["--preset", "tiny", "--data", str(data), "--steps", "3", "--batch-size", "4", "--grid-steps", "2",
               "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", BENCH, "train",
           "dit", *options, "--out", str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(tiny(one, data, steps=3, batch_size=4, grid_steps=2), one, progress=False, device="cpu")
    s1, s2 = states(one), states(two)
    assert s2["step"] == 3
    for name in s1["model"]:
        torch.testing.assert_close(s2["model"][name], s1["model"][name], **DDP_TOL, msg=name)
    # rank 0 alone wrote the log (3 rows, not 6) and its losses are the global-batch means
    rows1, rows2 = loss_rows(one), loss_rows(two)
    assert len(rows2) == 3
    for r1, r2 in zip(rows1, rows2):
        assert float(r2["loss"]) == pytest.approx(float(r1["loss"]), rel=1e-4)


@pytest.mark.parametrize("whom", ["process", "group"])
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data, tmp_path, whom):
    """SIGTERM to the trainer, or to its whole process group with a loader worker (timeout, schedulers)."""
    run = tmp_path / "run"
    cmd = [BENCH, "train", "dit", "--preset", "tiny", "--data", str(data), "--steps", "100000", "--out", str(run),
           "--ckpt-every", "100000", "--sample-every", "100000", "--workers", "1" if whom == "group" else "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=whom == "group")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run / "loss.csv").exists() and len(loss_rows(run)) >= 2:
            break
        time.sleep(0.2)
    if whom == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    step = states(run)["step"]
    assert step >= 2 and len(loss_rows(run)) == step
    # and the run goes on from there
    train(tiny(run, data, resume=True, steps=step + 1), run, resume=True, progress=False)
    assert states(run)["step"] == step + 1


def test_the_host_waits_for_the_device_only_at_logging_and_checkpoint_steps(data, tmp_path, monkeypatch):
    """One all-reduce (and one read of its result) per logging or checkpoint step, none in between; the loss log
    holds the means of each window."""
    import bench.train as trainer

    checks = []
    real = trainer.Distributed.all_sum

    def counting(self, values):
        checks.append(1)
        return real(self, values)

    monkeypatch.setattr(trainer.Distributed, "all_sum", counting)
    run = tmp_path / "run"
    train(tiny(run, data, steps=8, log_every=3, ckpt_every=4), run, progress=False)
    assert len(checks) == 4  # steps 3, 4, 6, 8
    assert [int(r["step"]) for r in loss_rows(run)] == [3, 6, 8]


def test_a_nonfinite_loss_between_checks_is_caught_and_never_saved(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real, calls = flow.flow_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("inf") if len(calls) == 3 else loss

    monkeypatch.setattr(flow, "flow_loss", poisoned)
    with pytest.raises(BenchError, match=r"loss is inf at step 3: training stopped at step 4") as e:
        train(tiny(run, data, steps=8, ckpt_every=2, log_every=4), run, progress=False)
    assert "(step 2)" in str(e.value)
    assert states(run)["step"] == 2


def test_nonfinite_weights_are_never_saved(data, tmp_path, monkeypatch):
    """A weight that is not finite while the loss still is: the next check stops the run before its checkpoint."""
    import bench.train as trainer

    run = tmp_path / "run"
    real, updates = trainer.update_ema, []

    def breaking(ema, model, decay):
        updates.append(1)
        if len(updates) == 3:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        real(ema, model, decay)

    monkeypatch.setattr(trainer, "update_ema", breaking)
    with pytest.raises(BenchError, match="the weights are not finite after step 3"):
        train(tiny(run, data, steps=6, ckpt_every=2, log_every=3), run, progress=False)
    state = states(run)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_data_is_ready_before_the_process_group(tmp_path, monkeypatch):
    """Rank 0 writes the default synthetic set before any collective; the others wait for its manifest, and the
    process group gets the trainer's timeout."""
    import threading

    import torch.distributed as dist

    import bench.train as trainer
    from bench.synth import ensure_default_set, read_manifest, wait_for_default_set

    monkeypatch.chdir(tmp_path)
    cfg = make_config("dit", tmp_path / "run", preset="tiny", synth_n=12, steps=1)
    assert cfg.synthetic
    order = []

    class Stop(Exception):
        pass

    def group(backend, **kwargs):
        m = read_manifest(tmp_path / cfg.data)
        order.append(("init_process_group", backend, kwargs.get("timeout"), m is not None and m.complete))
        raise Stop

    monkeypatch.setattr(dist, "init_process_group", group)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(Stop):
        train(cfg, tmp_path / "run", device="cpu", progress=False)
    assert order == [("init_process_group", "gloo", trainer.PROCESS_GROUP_TIMEOUT, True)]

    # another rank waits for a set rank 0 is still writing, then goes on; with nobody writing, it gives up
    other = tmp_path / "other"
    writer = threading.Timer(1.0, lambda: ensure_default_set(other, 12, 16, progress=False))
    writer.start()
    assert wait_for_default_set(other, 12, 16, timeout_s=120, poll_s=0.1) == other
    writer.join()
    with pytest.raises(BenchError, match="waited 0 min for"):
        wait_for_default_set(tmp_path / "nobody", 12, 16, timeout_s=0.2, poll_s=0.05)


def test_adamw_is_multi_tensor_on_the_cpu_and_fused_on_cuda(data, tmp_path):
    from bench.train import make_optimizer, optimizer_flags

    assert optimizer_flags(torch.device("cuda")) == {"fused": True, "foreach": False}
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], 1e-3, torch.device("cpu"))
    assert opt.param_groups[0]["foreach"] is True and not opt.param_groups[0]["fused"]
    # a checkpoint written with other flags (another device, an older version) resumes with this device's
    run = tmp_path / "run"
    train(tiny(run, data, steps=1), run, progress=False)
    state = states(run)
    state["optimizer"]["param_groups"][0]["foreach"] = None
    from bench.checkpoint import save_atomic

    save_atomic(state, run / "checkpoints" / "last.pt")
    train(tiny(run, data, resume=True, model="dit", steps=2), run, resume=True, progress=False)
    assert states(run)["optimizer"]["param_groups"][0]["foreach"] is True
