"""`bench run --preset tiny` end to end: interrupted in training, resumed without redoing finished stages (training
continues from its checkpoint), a report with a row per backbone and its plots, and a re-run that skips everything."""
import csv
import dataclasses
import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import bench.train
from bench.checkpoint import load
from bench.cli import app
from bench.errors import BenchError
from bench.presets import BUDGETS, recipe

MODELS = ["sisma", "sisma:scan=raster", "dit:cond=add"]  # a backbone, a variant of it, a variant of another
STAGES = ["data", "train:sisma@0", "train:sisma:scan=raster@0", "train:dit:cond=add@0", "sample", "speed", "parser",
          "quality", "report"]
PLOTS = ["latency.png", "scaling.png", "quality_latency.png", "quality_training.png", "loss.png", "samples.png"]


def table_models(md: str, heading: str) -> list[str]:
    """First-column cells of the first Markdown table after ``heading``."""
    lines = md.splitlines()
    rows = []
    for line in lines[lines.index(heading) + 1:]:
        if line.startswith("|"):
            rows.append(line.strip("|").split("|")[0].strip())
        elif rows or line.startswith("## "):
            break
    return rows[2:]


def test_tiny_run_interrupted_resumed_and_skipped(workdir, monkeypatch):
    results, reports = workdir / "res", workdir / "rep"
    # One thread: on a shared, loaded machine two intra-op threads can make tiny models 100x slower.
    args = ["run", "--preset", "tiny", "--results", str(results), "--reports", str(reports), "--threads", "1",
            "--models", ",".join(MODELS)]
    state_path = results / "run_tiny" / "state.json"
    runner = CliRunner()
    real_train = bench.train.train
    # the snapshot at half the steps scored on half the masks (as cpu scores its snapshots on fewer)
    budget = dataclasses.replace(BUDGETS["tiny"], quality_snapshot_masks=BUDGETS["tiny"].quality_masks // 2)
    monkeypatch.setitem(BUDGETS, "tiny", budget)
    assert budget.quality_fractions == (0.5, 1.0) and budget.quality_masks > 0
    calls = []

    # 1. sisma and its variant train; dit:cond=add is killed after its first checkpoint (as SIGKILL would).
    def killed_during_dit(cfg, run_dir, resume=False, device=None, progress=True):
        calls.append(cfg.variant)
        if cfg.model == "dit":
            real_train(dataclasses.replace(cfg, steps=budget.ckpt_every), run_dir, resume, device, progress=False)
            raise KeyboardInterrupt
        return real_train(cfg, run_dir, resume, device, progress=False)

    monkeypatch.setattr(bench.train, "train", killed_during_dit)
    first = runner.invoke(app, args)
    assert first.exit_code == 130, first.output
    assert calls == MODELS
    state = json.loads(state_path.read_text())
    assert state["stages"]["data"]["status"] == "done" and state["stages"]["train:sisma@0"]["status"] == "done"
    assert state["stages"]["train:dit:cond=add@0"]["status"] == "running" and "sample" not in state["stages"]
    dit_run, = (results / "run_tiny" / "runs" / "dit_cond-add").glob("seed0-*")  # seed0-<hash of its settings>
    assert load(dit_run / "checkpoints" / "last.pt")["step"] == budget.ckpt_every

    # 2. The same command again: sisma not retrained, dit continues from its checkpoint, the rest runs.
    resumed = []

    def recording(cfg, run_dir, resume=False, device=None, progress=True):
        start = load(run_dir / "checkpoints" / "last.pt")["step"] if resume else 0
        resumed.append((cfg.variant, resume, start))
        return real_train(cfg, run_dir, resume, device, progress=False)

    monkeypatch.setattr(bench.train, "train", recording)
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert resumed == [("dit:cond=add", True, budget.ckpt_every)]
    assert "train sisma, seed 0 (tiny preset, 20 steps): done on" in second.output
    state2 = json.loads(state_path.read_text())
    assert list(state2["stages"]) == STAGES and all(s["status"] == "done" for s in state2["stages"].values())
    assert state2["stages"]["train:sisma@0"] == state["stages"]["train:sisma@0"]
    with (dit_run / "loss.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, recipe("tiny", "dit").steps + 1))

    report = reports / "tiny.md"
    md = report.read_text()
    assert table_models(md, "## Speed") == MODELS
    assert table_models(md, "## Quality") == MODELS
    assert table_models(md, "## Training") == MODELS
    assert "smoke test" in md
    for name in PLOTS:
        with Image.open(reports / "tiny" / name) as im:
            assert im.format == "PNG" and min(im.size) > 100
    assert "### SISMA's token mixing: scan order x conv" in md  # the ablation: sisma against sisma:scan=raster
    with (results / "quality.csv").open() as f:
        rows = list(csv.DictReader(f))
    steps = recipe("tiny", "sisma").steps
    # every run scored at half and at all of its steps (budget.quality_fractions), with its per-mask scores
    assert sorted((r["model"], int(r["train_step"])) for r in rows) == sorted(
        (m, k) for m in MODELS for k in (steps // 2, steps))
    with (results / "quality_masks.csv").open() as f:
        masks = list(csv.DictReader(f))
    assert sorted((r["model"], int(r["train_step"]), int(r["n_masks"])) for r in rows) == sorted(
        (m, k, budget.quality_masks if k == steps else budget.quality_snapshot_masks) for m in MODELS
        for k in (steps // 2, steps))
    assert len(masks) == len(MODELS) * (budget.quality_masks + budget.quality_snapshot_masks)
    assert {m["eval_key"] for m in masks} == {r["eval_key"] for r in rows}

    # 3. Once more: every stage is skipped and nothing is appended or retrained.
    resumed.clear()
    speed_rows = (results / "speed.csv").read_text()
    third = runner.invoke(app, args)
    assert third.exit_code == 0, third.output
    assert resumed == [] and third.output.count("skipped") == len(STAGES)
    assert json.loads(state_path.read_text())["stages"] == state2["stages"]
    assert (results / "speed.csv").read_text() == speed_rows


def test_run_rejects_bad_options(workdir):
    runner = CliRunner()
    for args, words in ((["--preset", "huge"], "huge"), (["--models", "sisma,nope"], "nope"),
                        (["--data", str(workdir / "absent")], "absent"), (["--steps", "0"], "--steps")):
        result = runner.invoke(app, ["run", *args, "--results", str(workdir / "r")])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error:") and words in result.output
    assert not (workdir / "r").exists()


def test_dry_run_prints_each_stage_and_each_runs_recipe_and_does_nothing(workdir):
    result = CliRunner().invoke(app, ["run", "--preset", "cpu", "--dry-run", "--results", str(workdir / "r"),
                                      "--models", "sisma,dit:cond=add", "--seeds", "0,1"])
    assert result.exit_code == 0, result.output
    out = result.output
    for stage in ["train sisma, seed 0", "train sisma, seed 1", "train dit:cond=add, seed 1", "speed", "quality"]:
        assert stage in out
    cpu = recipe("cpu", "sisma")
    assert f"lr: {cpu.lr}" in out and f"batch_size: {cpu.batch_size}" in out and f"steps: {cpu.steps}" in out
    assert 'model_overrides: {"cond": "add"}' in out
    assert not (workdir / "r").exists() and not (workdir / "data").exists()


def test_train_and_run_read_the_same_recipe(workdir):
    from bench.pipeline import Pipeline, RunOptions
    from bench.train import make_config
    from bench.variants import parse_variant

    for model in ["sisma", "dit", "sdm"]:
        cfg = make_config(model, workdir / "runs" / model, preset="cpu")
        pipe = Pipeline(RunOptions(preset="cpu", models=[model], results=workdir / "r"))
        via_run = make_config(parse_variant(model), workdir / "runs" / (model + "-run"),
                              **pipe.train_options(pipe.variants[0], 0))
        # the same config, but for the snapshots bench run keeps to score quality against training
        assert {**dataclasses.asdict(cfg), "keep_at": via_run.keep_at} == dataclasses.asdict(via_run)
        r = recipe("cpu", model)
        assert (cfg.lr, cfg.batch_size, cfg.steps, cfg.ema_decay) == (r.lr, r.batch_size, r.steps, r.ema_decay)


# ---------------------------------------------------------------------------------------------- training as jobs

def loss_curves(results):
    """step, loss, lr and grad_norm of every run's loss.csv (timings left out), by run folder."""
    curves = {}
    for path in sorted((results / "run_tiny" / "runs").glob("*/*/loss.csv")):
        with path.open() as f:
            curves[str(path.relative_to(results))] = [(r["step"], r["loss"], r["lr"], r["grad_norm"])
                                                      for r in csv.DictReader(f)]
    return curves


@pytest.mark.slow  # about a minute on two cores: two whole tiny runs (pytest -m slow)
def test_local_launcher_gives_the_same_report_and_loss_curves(workdir, monkeypatch):
    """`bench run --launcher local` trains each run in a job of its own process and ends as the run without it: the
    same rows per model and, training being reproducible at a fixed thread count, the same loss curves bit for bit."""
    import bench.launch

    monkeypatch.setattr(bench.launch, "POLL_S", 0.2)
    models = "sisma,dit"
    runner = CliRunner()
    common = ["run", "--preset", "tiny", "--threads", "1", "--models", models]
    here = runner.invoke(app, [*common, "--results", str(workdir / "a"), "--reports", str(workdir / "ra")])
    assert here.exit_code == 0, here.output
    jobs = runner.invoke(app, [*common, "--results", str(workdir / "b"), "--reports", str(workdir / "rb"),
                               "--launcher", "local", "--jobs", "2"])
    assert jobs.exit_code == 0, jobs.output
    assert jobs.output.count("submitted as local job") == 2
    state = json.loads((workdir / "b" / "run_tiny" / "state.json").read_text())
    for name in ("train:sisma@0", "train:dit@0"):
        record = state["stages"][name]
        assert record["status"] == "done" and record["job"]["launcher"] == "local" and record["job"]["id"]
    curves = loss_curves(workdir / "a")
    assert curves and curves == loss_curves(workdir / "b")
    for model in ("sisma", "dit"):
        ca, = (workdir / "a" / "run_tiny" / "runs" / model).glob("seed0-*/checkpoints/last.pt")
        cb, = (workdir / "b" / "run_tiny" / "runs" / model).glob("seed0-*/checkpoints/last.pt")
        sa, sb = load(ca), load(cb)
        assert all(torch.equal(sa["ema"][k], sb["ema"][k]) for k in sa["ema"])
    ra, rb = (workdir / "ra" / "tiny.md").read_text(), (workdir / "rb" / "tiny.md").read_text()
    for heading in ("## Speed", "## Quality", "## Training"):
        assert table_models(ra, heading) == table_models(rb, heading) == models.split(",")
    # once more: every stage is done, nothing is submitted
    again = runner.invoke(app, [*common, "--results", str(workdir / "b"), "--reports", str(workdir / "rb"),
                                "--launcher", "local", "--jobs", "2"])
    assert again.exit_code == 0 and "submitted" not in again.output and again.output.count("skipped") == 8


class FakeJob:
    def __init__(self, job_id, result=None, error=None):
        self.job_id, self._result, self._error = job_id, result, error
        self.paths = type("Paths", (), {"stdout": f"jobs/{job_id}.out", "stderr": f"jobs/{job_id}.err"})()

    def result(self):
        if self._error:
            raise self._error
        return self._result


class FakeLauncher:
    """bench.launch.Launcher's interface, recording what the pipeline asks of it."""

    attached: dict = {}
    calls: list = []

    def __init__(self, opts, folder, cuda):
        self.name, self.capacity, self.processes = opts.launcher, opts.jobs, 1

    def submit(self, spec_path):
        FakeLauncher.calls.append(("submit", json.loads(spec_path.read_text())["run_dir"]))
        return FakeJob(f"new{len(FakeLauncher.calls)}", {"step": 20, "loss": 0.1, "wall_s": 2.0})

    def record(self, job, spec_path):
        return {"launcher": self.name, "id": job.job_id, "log": job.paths.stdout}

    def attach(self, record):
        FakeLauncher.calls.append(("attach", record["id"]))
        return FakeLauncher.attached.get(record["id"])

    def done(self, job):
        return True

    def result(self, job):
        return job.result()

    def error(self, job, e):
        return f"job {job.job_id} failed: {e}"

    def interrupt(self, jobs):
        pass


def test_a_recorded_job_is_collected_not_submitted_again(workdir, monkeypatch):
    import bench.launch
    from bench.launch import LaunchOptions
    from bench.pipeline import Pipeline, RunOptions, plain

    monkeypatch.setattr(bench.launch, "Launcher", FakeLauncher)
    monkeypatch.setattr(bench.launch, "POLL_S", 0.0)
    monkeypatch.setattr(bench.launch, "slurm_available", lambda: True)
    pipe = Pipeline(RunOptions(preset="tiny", models=["dit", "sdm"], results=workdir / "r",
                               launch=LaunchOptions(launcher="slurm")), echo=lambda *a: None)
    stages = [(i, s) for i, s in enumerate(pipe.stages(), 1) if s.name.startswith("train:")]
    (i_dit, dit), (i_sdm, sdm) = stages
    # slurm jobs get GPUs unless --device cpu, whatever this process runs on, and resolve the device themselves
    assert pipe.jobs_on_cuda() and pipe.job_device() == "auto"
    state = {"stages": {s.name: {"status": "submitted", "settings": plain(s.settings), "started": "earlier",
                                 "submitted_at": 0.0, "job": {"launcher": "slurm", "id": job}}
                        for s, job in ((dit, "4242"), (sdm, "gone"))}}
    FakeLauncher.attached = {"4242": FakeJob("4242", {"step": 20, "loss": 0.1, "wall_s": 3.0})}
    FakeLauncher.calls = []
    ran = set()
    pipe.run_jobs(stages, state, ran, 9)
    # 4242 (still queued, running or finished) is collected; "gone" cannot be attached and is submitted again
    assert FakeLauncher.calls[:2] == [("attach", "4242"), ("attach", "gone")]
    assert [c[0] for c in FakeLauncher.calls[2:]] == ["submit"] and "sdm" in FakeLauncher.calls[2][1]
    assert ran == {dit.name, sdm.name}
    assert state["stages"][dit.name]["status"] == "done" and state["stages"][dit.name]["job"]["id"] == "4242"
    assert state["stages"][dit.name]["outputs"]["step"] == 20
    assert state["stages"][sdm.name]["job"]["id"] == "new3"
    saved = json.loads(pipe.state_path.read_text())
    assert saved["stages"][sdm.name]["status"] == "done"

    # a job that failed: one line naming it, the stage marked failed, submitted again by the next run
    state["stages"][dit.name] = {"status": "submitted", "settings": plain(dit.settings), "started": "earlier",
                                 "job": {"launcher": "slurm", "id": "77"}}
    FakeLauncher.attached = {"77": FakeJob("77", error=RuntimeError("CUDA out of memory"))}
    FakeLauncher.calls = []
    with pytest.raises(BenchError, match=r"1 training job\(s\) failed: train:dit@0: job 77 failed: CUDA out of memory"):
        pipe.run_jobs(stages[:1], state, set(), 9)
    assert state["stages"][dit.name]["status"] == "failed"
    pipe.run_jobs(stages[:1], state, set(), 9)
    assert [c[0] for c in FakeLauncher.calls] == ["attach", "submit"]
    # training in this process while a slurm job may still train the run is refused
    state["stages"][dit.name] = {"status": "submitted", "job": {"launcher": "slurm", "id": "5"}}
    with pytest.raises(BenchError, match="submitted as slurm job 5"):
        pipe.check_no_job(dit, state["stages"][dit.name])


def test_launcher_options_and_the_slurm_submission(tmp_path, monkeypatch):
    import submitit

    import bench.launch
    from bench.launch import Launcher, LaunchOptions, parse_slurm_options

    monkeypatch.setattr(bench.launch, "slurm_available", lambda: False)
    with pytest.raises(BenchError, match="no srun here"):
        LaunchOptions(launcher="slurm").check()
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # as on a cluster

    assert parse_slurm_options("partition=gpu, account=abc,--qos=high") == {"partition": "gpu", "account": "abc",
                                                                            "qos": "high"}
    for bad, words in ((LaunchOptions(launcher="pbs"), "--launcher pbs"), (LaunchOptions(launcher="local", jobs=0),
                       "--jobs"), (LaunchOptions(slurm={"a": "b"}), "--slurm options need")):
        with pytest.raises(BenchError, match=words):
            bad.check()
    with pytest.raises(BenchError, match="KEY=VALUE"):
        parse_slurm_options("partition")
    assert LaunchOptions(launcher="local", jobs=2).job_threads() == 1
    assert LaunchOptions(launcher="slurm", jobs=2).job_threads() is None
    launcher = Launcher(LaunchOptions(launcher="slurm", gpus=4, minutes=600, slurm={"partition": "gpu"}),
                        tmp_path / "jobs", cuda=True)
    assert launcher.processes == 4
    text = launcher._executor([])._make_submission_file_text("python -u -m submitit.core._submit jobs", "uid")
    for line in ("#SBATCH --gpus-per-node=4", "#SBATCH --time=600", "#SBATCH --partition=gpu", "#SBATCH --nodes=1",
                 "#SBATCH --ntasks-per-node=1"):
        assert line in text, text


def test_a_job_over_two_processes_runs_torchrun(workdir):
    """A training job with two processes runs `torchrun --nproc-per-node 2 -m bench.launch SPEC` (gloo on the CPU
    here); rank 0 writes the result the job returns."""
    import dataclasses as dc

    from bench.launch import TrainJob, train_spec, write_spec
    from bench.synth import ensure_synthetic
    from bench.train import make_config

    faces = ensure_synthetic(workdir / "faces", n=12, size=32, seed=0, progress=False)
    run = workdir / "run"
    cfg = make_config("dit", run, preset="tiny", data=str(faces), steps=2, batch_size=4, grid_steps=2, grid_masks=1)
    spec = write_spec(train_spec(dc.asdict(cfg), run, "cpu", 1, 2), workdir / "job.json")
    result = TrainJob(str(spec))()
    assert result["step"] == 2 and load(run / "checkpoints" / "last.pt")["step"] == 2
    assert json.loads((workdir / "job.result.json").read_text()) == result


def test_local_jobs_on_cuda_get_gpus_of_their_own(tmp_path, monkeypatch):
    """Four GPUs, two per job: two jobs at once, on GPUs 0-1 and 2-3; a finished job's GPUs go to the next."""
    import bench.launch
    from bench.launch import Launcher, LaunchOptions

    monkeypatch.setattr(bench.launch, "_gpu_count", lambda: 4)
    given = []

    class Executor:
        def __init__(self, gpus):
            self.gpus = gpus

        def submit(self, fn):
            given.append(self.gpus)
            return FakeJob(str(len(given)), {"step": 1})

    launcher = Launcher(LaunchOptions(launcher="local", jobs=3, gpus=2), tmp_path, cuda=True)
    monkeypatch.setattr(launcher, "_executor", Executor)
    assert launcher.capacity == 2 and launcher.processes == 2
    first = launcher.submit(tmp_path / "a.json")
    launcher.submit(tmp_path / "b.json")
    assert given == [[0, 1], [2, 3]] and launcher.capacity == 2
    launcher.result(first)
    launcher.submit(tmp_path / "c.json")
    assert given[-1] == [0, 1]


def test_a_stage_whose_input_finished_after_it_in_an_earlier_command_is_redone():
    """Training continued to more steps over several resumed commands: the sample grid made after the shorter training
    is stale, though no stage of the last command redid its inputs; an input finished before it leaves it done."""
    from types import SimpleNamespace

    from bench.pipeline import Pipeline
    from bench.run_setup import Stage

    stage = Stage("sample", "sample grid", {"steps": 50}, ("train:sisma@0",), lambda: {})
    record = {"status": "done", "settings": {"steps": 50}, "outputs": {}, "finished": "2026-12-07T17:16:26+00:00"}
    runner = SimpleNamespace(opts=SimpleNamespace(force=False))
    before = {"train:sisma@0": {"status": "done", "finished": "2026-12-07T17:10:00+00:00"}}
    after = {"train:sisma@0": {"status": "done", "finished": "2026-12-07T18:13:36+00:00"}}
    assert Pipeline.is_done(runner, stage, record, set(), before)
    assert not Pipeline.is_done(runner, stage, record, set(), after)
    assert not Pipeline.is_done(runner, stage, record, {"train:sisma@0"}, before)
    assert not Pipeline.is_done(runner, stage, {**record, "settings": {"steps": 20}}, set(), before)
