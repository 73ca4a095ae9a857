"""Fault injection: bad input and damaged files give one line (no traceback), exit 2, and change no existing file.

One or more cases per category: nothing deleted that the user did not ask to delete; concurrent writers lose
nothing; checkpoints verified; paths read from files stay inside their folder; options validated and files parsed
safely; a run's state belongs to the machine that made it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.synth import ensure_synthetic

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH = [sys.executable, "-c", "from bench.cli import app; app()"]


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def one_line_error(result, *words):
    """The command failed with exit 2 and one line starting with 'error:' that contains ``words``."""
    text = result.output.strip()
    assert result.exit_code == 2, text
    assert text.startswith("error:") and len(text.splitlines()) == 1, text
    assert "Traceback" not in text
    for w in words:
        assert w in text, (w, text)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("faces"), n=24, size=32, seed=0, progress=False)


@pytest.fixture
def run(tmp_path, data):
    """A tiny sdm run of 4 steps: checkpoints at 2 and 4, snapshots kept at both."""
    out = tmp_path / "run"
    result = invoke("train", "sdm", "--preset", "tiny", "--data", data, "--steps", 4, "--ckpt-every", 2,
                    "--keep-every", 2, "--sample-every", 100, "--grid-steps", 1, "--out", out)
    assert result.exit_code == 0, result.output
    return out


# --- 1. nothing is deleted that the user did not ask to delete -------------------------------------------------

def test_runs_of_other_settings_live_side_by_side(tmp_path, monkeypatch):
    from bench import presets
    from bench.pipeline import Pipeline, RunOptions

    def folder(**kw):
        pipe = Pipeline(RunOptions(preset="cpu", models=["sisma"], results=tmp_path / "r", **kw))
        return pipe.run_dir(pipe.variants[0], pipe.opts.seeds[0])

    base = folder()
    assert folder(seeds=[1]) != base  # another seed: another folder
    assert folder(steps=900) == base  # a longer run continues the same one
    changed = {**presets.RECIPES["cpu"], "sisma": presets.Recipe(**{**presets.RECIPES["cpu"]["sisma"].__dict__,
                                                                     "lr": 5e-4})}
    monkeypatch.setitem(presets.RECIPES, "cpu", changed)
    assert folder() != base  # another recipe: another folder, the earlier run untouched


def test_bench_run_never_deletes_a_run_without_force(tmp_path, monkeypatch, data):
    from bench.pipeline import Pipeline, RunOptions

    removed = []
    monkeypatch.setattr(shutil, "rmtree", lambda p, *a, **k: removed.append(p))
    pipe = Pipeline(RunOptions(preset="tiny", models=["sdm"], results=tmp_path / "r", data=data))
    v = pipe.variants[0]
    pipe.run_dir(v, 0).mkdir(parents=True)
    (pipe.run_dir(v, 0) / "config.json").write_text("{}")  # a first run that died before its first checkpoint
    monkeypatch.setattr("bench.train.train", lambda cfg, run_dir, **k: {"step": 0, "wall_s": 0.0})
    pipe.stage_train(v, 0)  # starts again in place
    assert removed == []


def test_a_failed_first_run_can_be_retried_in_its_folder(tmp_path, data):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model": "sdm"}))  # what a crash before step 1 leaves
    result = invoke("train", "sdm", "--preset", "tiny", "--data", data, "--steps", 1, "--grid-steps", 1, "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "checkpoints" / "last.pt").is_file()


# --- 2. concurrent writers lose nothing; foreign results files are refused before any work ---------------------

@pytest.mark.slow  # 14 s of three timing processes; the suite must stay under ten minutes on two cores
def test_three_speed_processes_on_one_file_keep_every_row(tmp_path):
    out = tmp_path / "speed.csv"
    first = subprocess.run(BENCH + ["speed", "--flops-only", "--preset", "tiny", "--models", "sdm",
                                    "--resolutions", "16", "--out", str(out)], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    before = out.read_text().splitlines()
    procs = [subprocess.Popen(BENCH + ["speed", "--flops-only", "--preset", "tiny", "--models", model,
                                       "--resolutions", "16,32", "--out", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for model in ("sisma", "dit", "sdm")]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    lines = out.read_text().splitlines()
    assert lines[: len(before)] == before  # earlier rows untouched, in place
    import csv

    rows = list(csv.DictReader(lines))
    assert sorted((r["model"], r["resolution"]) for r in rows) == sorted(
        [("sdm", "16")] + [(m, r) for m in ("sisma", "dit", "sdm") for r in ("16", "32")])


def test_a_foreign_quality_file_is_refused_before_any_work(tmp_path, run, data):
    out = tmp_path / "q.csv"
    out.write_bytes(b"\x89PNG not a csv at all")
    before = tree(tmp_path)
    one_line_error(invoke("quality", "--runs", run, "--data", data, "--out", out, "--steps", 1, "--n-masks", 1),
                   "q.csv", "not a sis-bench QualityRow file")
    assert tree(tmp_path) == before  # nothing sampled into the run, nothing written


# --- 3. checkpoints are verified -----------------------------------------------------------------------------

def test_a_damaged_checkpoint_is_refused_naming_the_newest_intact_snapshot(run, data):
    last = run / "checkpoints" / "last.pt"
    raw = bytearray(last.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in the middle: torch would load it without a complaint
    last.write_bytes(bytes(raw))
    before = tree(run)
    result = invoke("train", "sdm", "--out", run, "--resume", "--steps", 6)
    # step_0000004.pt is a hard link to the same bytes as last.pt (damaged with it): step 2 is the newest intact
    one_line_error(result, "last.pt is damaged", "step_0000002.pt")
    assert tree(run) == before
    one_line_error(invoke("sample", run, "--n", 1, "--steps", 1, "--out", run / "s"), "damaged")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"\x00" * 64])
def test_unreadable_checkpoints_of_any_size_are_one_line_errors(run, content):
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(content)
    (run / "checkpoints" / "last.pt.sha256").unlink()  # no digest: the file itself is checked
    before = tree(run)
    one_line_error(invoke("sample", run, "--n", 1, "--steps", 1, "--out", run / "s"), "last.pt")
    assert tree(run) == before


def test_an_interrupted_save_leaves_no_temporary_file(run, data):
    stale = run / "checkpoints" / ".last.pt.abc123.tmp"  # what a process killed while saving leaves
    stale.write_bytes(b"half a checkpoint")
    result = invoke("train", "sdm", "--out", run, "--resume", "--steps", 5, "--grid-steps", 1)
    assert result.exit_code == 0, result.output
    assert not stale.exists() and not list((run / "checkpoints").glob(".*.tmp"))


# --- 4. paths read from files stay inside their folder ---------------------------------------------------------

def test_a_sample_record_pointing_outside_its_folder_is_refused(tmp_path, run):
    res = tmp_path / "results"
    folder = res / "run_cpu" / "samples" / "sdm"
    (folder / "masks").mkdir(parents=True)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the report")
    (folder / "samples.json").write_text(json.dumps({
        "model": "sdm", "preset": "cpu", "files": [{"index": 0, "image": "../../../../secret.png",
                                                    "mask": "masks/00000.png", "mask_source": "test-1"}]}))
    from bench.io import ResultsFile
    from bench.rows import QualityRow

    ResultsFile(res / "quality.csv", QualityRow).append([{"model": "sdm", "preset": "cpu", "train_step": 4,
                                                           "run": str(run), "miou": 0.5, "timestamp": "2025"}])
    before = tree(tmp_path)
    one_line_error(invoke("report", "--results", res, "--reports", tmp_path / "rep"), "outside", "samples.json")
    assert tree(tmp_path) == before


def test_a_results_row_naming_a_folder_outside_is_refused(tmp_path):
    from bench.io import ResultsFile
    from bench.rows import QualityRow

    res = tmp_path / "project" / "results"
    ResultsFile(res / "quality.csv", QualityRow).append([{"model": "sdm", "preset": "cpu", "train_step": 4,
                                                           "run": "/etc", "miou": 0.5, "timestamp": "2025"}])
    one_line_error(invoke("report", "--results", res, "--reports", tmp_path / "rep"), "outside")


# --- 5. every option validated, every file parsed safely -------------------------------------------------------

@pytest.mark.parametrize("option, value, words", [
    ("--warmup", -5, ["--warmup", "0 or more"]),
    ("--grad-clip", -1.0, ["--grad-clip", "0 (off)"]),
    ("--keep-every", -2, ["--keep-every", "0 or more"]),
    ("--workers", -1, ["--workers", "0 or more"]),
    ("--lr", "nan", ["--lr", "positive"]),
    ("--p-uncond", 1.5, ["--p-uncond", "[0, 1)"]),
])
def test_training_options_out_of_range(tmp_path, data, option, value, words):
    out = tmp_path / "run"
    one_line_error(invoke("train", "sdm", "--preset", "tiny", "--data", data, option, value, "--out", out), *words)
    assert not out.exists()


@pytest.mark.parametrize("value, words", [("nan", ["--guidance", "finite"]), ("-1", ["--guidance", "0 or more"])])
def test_guidance_out_of_range(run, value, words):
    before = tree(run)
    one_line_error(invoke("sample", run, "--guidance", value, "--n", 1, "--steps", 1), *words)
    assert tree(run) == before


def test_a_file_where_a_folder_is_expected(tmp_path, data):
    afile = tmp_path / "file"
    afile.write_text("x")
    one_line_error(invoke("train", "sdm", "--preset", "tiny", "--data", data, "--out", afile), "--out", "is a file")
    one_line_error(invoke("run", "--preset", "tiny", "--data", afile, "--results", tmp_path / "r"), "not a folder")
    one_line_error(invoke("speed", "--flops-only", "--preset", "tiny", "--models", "sdm", "--out", tmp_path),
                   "is a folder")
    assert afile.read_text() == "x"


@pytest.mark.parametrize("name, content, words", [
    ("config.json", "{not json", ["config.json", "not a readable run config"]),
    ("config.json", json.dumps({"model": "sdm", "nonsense": 1}), ["config.json", "not a sis-bench run config"]),
    ("loss.csv", "\x00\x01garbage\nmore", ["loss.csv", "not a readable loss log"]),
])
def test_damaged_run_files_on_resume(run, name, content, words):
    (run / name).write_text(content)
    before = tree(run)
    one_line_error(invoke("train", "sdm", "--out", run, "--resume", "--steps", 6), *words)
    assert tree(run) == before


def test_a_damaged_state_file_stops_bench_run_in_one_line(tmp_path):
    state = tmp_path / "r" / "run_tiny" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"version": 2, "stages": ')
    one_line_error(invoke("run", "--preset", "tiny", "--results", tmp_path / "r", "--reports", tmp_path / "rep"),
                   "state.json")
    assert state.read_text() == '{"version": 2, "stages": '


def test_an_error_is_not_glued_to_a_progress_bar(capsys):
    from tqdm import tqdm

    from bench.cli.common import one_line_errors
    from bench.errors import BenchError

    @one_line_errors
    def failing():
        bar = tqdm(total=10, desc="work")
        bar.update(3)
        raise BenchError("something is wrong")

    with pytest.raises(SystemExit):
        failing()
    err = capsys.readouterr().err
    assert "\nerror: something is wrong" in err or err.startswith("error: something is wrong")


def test_json_written_by_the_harness_is_strict(run):
    for path in list(run.rglob("*.json")):
        json.loads(path.read_text(), parse_constant=lambda c, path=path: pytest.fail(f"{path} holds {c}"))


# --- 7. a run's state belongs to the machine that made it --------------------------------------------------------

def test_a_speed_stage_done_on_another_machine_runs_again(tmp_path, monkeypatch):
    from bench import pipeline
    from bench.pipeline import Pipeline, RunOptions

    pipe = Pipeline(RunOptions(preset="tiny", models=["sdm"], results=tmp_path / "r"))
    speed = next(s for s in pipe.stages() if s.name == "speed")
    monkeypatch.setattr(pipeline, "machine_fingerprint", lambda: "another-machine")
    elsewhere = next(s for s in pipe.stages() if s.name == "speed")
    assert speed.settings["machine"] != elsewhere.settings["machine"]  # so the recorded stage is not "done" here
    train = next(s for s in pipe.stages() if s.name.startswith("train:"))
    assert "machine" not in train.settings  # training results do not depend on the machine: not redone for it


# --- 8. a full disk, a second process, a moved folder (issue 25) ------------------------------------------------

def full_disk_on(monkeypatch, *names, after: int = 0):
    """Atomic writes of files called ``names`` fail with ENOSPC, from their ``after``-th one on (0: every one)."""
    import errno

    from bench import io as bio

    opened = bio._open_temporary
    count = {}

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake(fd, target):
        f = opened(fd, target)
        if target.name in names:
            count[target.name] = count.get(target.name, 0) + 1
            if count[target.name] > after:
                return Full(f)
        return f

    monkeypatch.setattr(bio, "_open_temporary", fake)


@pytest.mark.parametrize("after, step", [(0, 2), (1, 4)])
def test_a_full_disk_at_the_digest_never_leaves_a_good_checkpoint_refused(tmp_path, monkeypatch, after, step):
    from bench.checkpoint import load, save_atomic, verified
    from bench.errors import BenchError

    last = tmp_path / "checkpoints" / "last.pt"
    save_atomic({"step": 2}, last)
    # after=0: the disk fills at the first digest write (before the rename): step 2 stays in place;
    # after=1: at the second one (after the rename): step 4 is in place and its digest, listing both, verifies it
    full_disk_on(monkeypatch, "last.pt.sha256", after=after)
    with pytest.raises(BenchError, match="disk full in"):
        save_atomic({"step": 4}, last)
    assert verified(last) and load(last)["step"] == step
    assert not list(last.parent.glob(".*.tmp"))


def test_a_full_disk_while_training_is_one_line_naming_the_folder(run, monkeypatch):
    from bench.checkpoint import load

    full_disk_on(monkeypatch, "last.pt")
    result = invoke("train", "sdm", "--out", run, "--resume", "--steps", 6, "--ckpt-every", 2, "--grid-steps", 1)
    last_line = result.output.strip().splitlines()[-1]  # after the progress bar, which the runner's output holds
    assert result.exit_code == 2 and last_line.startswith("error: disk full in"), result.output
    for words in ("checkpoints", "still holds the previous checkpoint", "MiB are free", "--resume"):
        assert words in last_line, last_line
    assert load(run / "checkpoints" / "last.pt")["step"] == 4
    assert not list((run / "checkpoints").glob(".*.tmp"))


@pytest.mark.parametrize("code, words", [("EROFS", ["read-only"]), ("EACCES", ["permission denied"]),
                                         ("ENOSPC", ["no space left"]), ("ENOENT", ["no such file"])])
def test_operating_system_errors_are_one_line_with_the_path(tmp_path, monkeypatch, data, code, words):
    import errno

    from bench import io as bio

    def refuse(fd, target):
        raise OSError(getattr(errno, code), os_strerror(getattr(errno, code)), str(target))

    monkeypatch.setattr(bio, "_open_temporary", refuse)
    out = tmp_path / "shared" / "preview.png"
    one_line_error(invoke("data", "preview", data, "--out", out, "--n", 2), "preview.png", *words)
    assert not out.exists() and not list(out.parent.glob(".*.tmp"))


def os_strerror(code: int) -> str:
    import os

    return os.strerror(code)


def resave(run, **changes):
    """Rewrite the run's last.pt through the harness with ``changes`` to its recorded config or weights."""
    from bench.checkpoint import load, save_atomic

    last = run / "checkpoints" / "last.pt"
    state = load(last)
    state["config"].update(changes.pop("config", {}))
    state.update(changes)
    save_atomic(state, last)


def test_a_checkpoint_of_another_backbone_is_named_as_foreign(run):
    resave(run, config={"model": "dit", "preset": "cpu", "variant": "dit"})
    before = tree(run)
    one_line_error(invoke("sample", run, "--n", 1, "--steps", 1, "--out", run / "s"), "foreign checkpoint",
                   "dit/cpu", "sdm/tiny")
    one_line_error(invoke("train", "sdm", "--out", run, "--resume", "--steps", 6), "foreign checkpoint")
    assert tree(run) == before


def test_a_checkpoint_whose_tensors_do_not_fit_is_one_line(run):
    import torch

    resave(run, ema={"nothing": torch.zeros(1)})
    before = tree(run)
    one_line_error(invoke("sample", run, "--n", 1, "--steps", 1, "--out", run / "s"), "does not fit", "foreign")
    assert tree(run) == before


def test_a_run_config_without_its_preset_is_one_line(run):
    config = json.loads((run / "config.json").read_text())
    del config["preset"]
    (run / "config.json").write_text(json.dumps(config))
    before = tree(run)
    one_line_error(invoke("sample", run, "--n", 1, "--steps", 1, "--out", run / "s"), "config.json", "'preset'")
    assert tree(run) == before


def test_two_trainings_into_one_folder_exactly_one_runs(tmp_path, data):
    import time

    out = tmp_path / "run"
    args = ["train", "sdm", "--preset", "tiny", "--data", str(data), "--grid-steps", "1", "--sample-every", "1000",
            "--out", str(out)]
    first = subprocess.Popen(BENCH + args + ["--steps", "40", "--seed", "1"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    owner = out / ".lock.owner"
    deadline = time.monotonic() + 120
    while not owner.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert owner.exists(), "the first training never took its folder's lock"
    second = subprocess.run(BENCH + args + ["--steps", "2", "--seed", "2"], capture_output=True, text=True)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    err = second.stderr.strip()
    assert second.returncode == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
    assert f"in use by process {first.pid} (started" in err, err
    assert json.loads((out / "config.json").read_text())["seed"] == 1  # the first run's, not overwritten
    assert not owner.exists()  # released with the lock


def test_a_second_bench_run_on_one_results_folder_is_refused(tmp_path):
    from bench.io import folder_lock
    from bench.pipeline import Pipeline, RunOptions

    results = tmp_path / "r"
    pipe = Pipeline(RunOptions(preset="tiny", models=["sdm"], results=results))
    with folder_lock(pipe.dir, "test", "wait"):
        before = tree(results)
        one_line_error(invoke("run", "--preset", "tiny", "--models", "sdm", "--results", results,
                              "--reports", tmp_path / "rep"), "in use by process", "started", "--results")
        assert tree(results) == before


def test_a_resume_with_nothing_to_do_changes_no_file(run):
    before = tree(run)
    result = invoke("train", "sdm", "--out", run, "--resume", "--steps", 2)
    assert result.exit_code == 0 and "nothing to do" in result.output, result.output
    assert tree(run) == before


@pytest.mark.parametrize("stages", [{"data": "not an object"}, {"data": {"outputs": ["a list"]}}])
def test_a_state_file_with_a_stage_that_is_not_an_object(tmp_path, stages):
    state = tmp_path / "r" / "run_tiny" / "state.json"
    state.parent.mkdir(parents=True)
    text = json.dumps({"version": 2, "stages": stages})
    state.write_text(text)
    one_line_error(invoke("run", "--preset", "tiny", "--models", "sdm", "--results", tmp_path / "r",
                          "--reports", tmp_path / "rep"), "state.json")
    assert state.read_text() == text


def test_paths_read_from_the_state_file_stay_in_their_folder(tmp_path, monkeypatch):
    from bench.errors import BenchError
    from bench.pipeline import Pipeline, RunOptions

    monkeypatch.chdir(tmp_path)
    pipe = Pipeline(RunOptions(preset="tiny", models=["sdm"], results=Path("r"), reports=Path("rep")))
    elsewhere = tmp_path / "elsewhere.md"
    elsewhere.write_text("not the report")
    report = next(s for s in pipe.stages() if s.name == "report")
    with pytest.raises(BenchError, match="outside"):
        report.outputs_exist({"report": str(elsewhere)})
    with pytest.raises(BenchError, match="outside"):
        report.outputs_exist({"report": "rep/../elsewhere.md"})
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "tiny.md").write_text("a report")
    assert report.outputs_exist({"report": "rep/tiny.md"})  # recorded relative to the working folder: inside


def test_atomic_writes_keep_the_umask_and_leave_no_temporaries(tmp_path):
    import os
    import stat

    from bench.io import write_text

    old = os.umask(0o022)
    try:
        path = write_text(tmp_path / "report.md", "a")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # what a plain write gives, not mkstemp's 0600
        os.umask(0o002)
        assert stat.S_IMODE(write_text(tmp_path / "shared.md", "b").stat().st_mode) == 0o664
        path.chmod(0o640)
        assert stat.S_IMODE(write_text(path, "c").stat().st_mode) == 0o640  # an existing file keeps its mode
    finally:
        os.umask(old)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".report.md.{dead.stdout.strip()}.abc_12.tmp"  # left by a killed writer
    stale.write_text("half")
    live = tmp_path / f".report.md.{os.getpid()}.xyz_34.tmp"  # another writer still at work (here: this process)
    live.write_text("half")
    write_text(tmp_path / "report.md", "d")
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("value", ["maybe", "2", "offline"])
def test_an_unrecognised_environment_switch_is_one_line(tmp_path, monkeypatch, value):
    monkeypatch.setenv("SIS_BENCH_OFFLINE", value)
    one_line_error(invoke("plan", "--preset", "tiny", "--models", "sdm"), "SIS_BENCH_OFFLINE", repr(value), "1, true")


def test_environment_switches_take_the_usual_words(monkeypatch):
    from bench.weights import env_switch, offline_reason

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for value, on in (("1", True), ("Yes", True), ("true", True), ("0", False), ("no", False), ("", False)):
        monkeypatch.setenv("SIS_BENCH_OFFLINE", value)
        assert env_switch("SIS_BENCH_OFFLINE") is on
        assert bool(offline_reason()) is on


@pytest.mark.parametrize("args, words", [
    (["plan", "--preset", "tiny", "--models", "sdm", "--batch-size", 0], ["--batch-size", "at least 1"]),
    (["plan", "--preset", "tiny", "--models", "sdm", "--batch-size", -4], ["--batch-size", "at least 1"]),
    (["plan", "--preset", "tiny", "--models", "sdm", "--processes", 0], ["--processes", "at least 1"]),
    (["plan", "--preset", "tiny", "--models", "dit:cond=add:cond=cross"], ["cond is given twice"]),
    (["data", "synth", "--out", "{tmp}/s", "--n", 4, "--size", 32, "--seed", -1], ["--seed", "0 or more"]),
    (["data", "preview", "{data}", "--n", 0, "--out", "{tmp}/p.png"], ["--n", "at least 1"]),
    (["data", "preview", "{data}", "--n", -1, "--out", "{tmp}/p.png"], ["--n", "at least 1"]),
    (["parser", "train", "--data", "{data}", "--steps", -5, "--out", "{tmp}/p.pt"], ["--steps", "at least 1"]),
    (["parser", "train", "--data", "{data}", "--batch-size", 0, "--out", "{tmp}/p.pt"], ["--batch-size"]),
    (["parser", "train", "--data", "{data}", "--lr", -1, "--out", "{tmp}/p.pt"], ["--lr", "positive"]),
    (["parser", "train", "--data", "{data}", "--size", 0, "--out", "{tmp}/p.pt"], ["--size", "at least 1"]),
    (["train", "sdm", "--preset", "tiny", "--data", "{data}", "--seed", -3, "--out", "{tmp}/r"], ["--seed"]),
    (["train", "sdm", "--preset", "tiny", "--synth-n", -5, "--out", "{tmp}/r"], ["--synth-n", "at least 1"]),
    (["run", "--preset", "tiny", "--models", "sdm", "--seeds", "0,-1", "--results", "{tmp}/r"], ["--seeds"]),
])
def test_options_out_of_range_everywhere(tmp_path, data, args, words):
    args = [str(a).format(tmp=tmp_path, data=data) for a in args]
    before = tree(tmp_path)
    one_line_error(invoke(*args), *words)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("option", ["--seed", "--n"])
def test_sample_and_quality_refuse_negative_values(run, data, option):
    before = tree(run)
    one_line_error(invoke("sample", run, option, -1, "--steps", 1, "--out", run / "s"), option)
    one_line_error(invoke("quality", "--runs", run, "--data", data, "--seed", -1, "--steps", 1), "--seed")
    assert tree(run) == before


def test_an_incomplete_synthetic_set_is_refused_with_the_command_that_finishes_it(tmp_path, data):
    partial = tmp_path / "partial"
    shutil.copytree(data, partial)
    manifest = json.loads((partial / "synth.json").read_text())
    (partial / "synth.json").write_text(json.dumps({**manifest, "complete": False}))  # what a killed synth leaves
    before = tree(tmp_path)
    finish = f"bench data synth --out {partial} --n {manifest['n']} --size {manifest['size']}"
    one_line_error(invoke("data", "check", partial), "incomplete synthetic set", finish)
    one_line_error(invoke("train", "sdm", "--preset", "tiny", "--data", partial, "--steps", 1, "--out",
                          tmp_path / "run"), "incomplete synthetic set", finish)
    assert tree(tmp_path) == before and not (tmp_path / "run").exists()


def test_a_run_finds_its_data_from_another_working_folder_and_refuses_other_data(tmp_path, monkeypatch, data):
    project, other = tmp_path / "project", tmp_path / "other"
    shutil.copytree(data, project / "data")
    shutil.copytree(data, other / "data")
    manifest = json.loads((other / "data" / "synth.json").read_text())
    (other / "data" / "synth.json").write_text(json.dumps({**manifest, "seed": 7}))  # another set, same layout
    monkeypatch.chdir(project)
    result = invoke("train", "sdm", "--preset", "tiny", "--data", "data", "--steps", 1, "--grid-steps", 1,
                    "--out", "run")
    assert result.exit_code == 0, result.output
    run = project / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == "data" and config["data_from_run"] == "../data" and config["data_fingerprint"]

    monkeypatch.chdir(other)  # its own ./data: the run still samples from the data it trained on
    result = invoke("sample", run, "--n", 1, "--steps", 1, "--out", tmp_path / "s")
    assert result.exit_code == 0, result.output
    assert Path(json.loads((tmp_path / "s" / "samples.json").read_text())["data"]).resolve() == project / "data"

    (project / "data").rename(project / "moved")  # the run's data gone: ./data here is another set, refused
    before = tree(tmp_path)
    one_line_error(invoke("sample", run, "--n", 1, "--steps", 1, "--out", tmp_path / "s2"),
                   "not the data set", "fingerprint")
    one_line_error(invoke("train", "sdm", "--out", run, "--resume", "--steps", 2), "not the data set")
    assert tree(tmp_path) == before
    result = invoke("train", "sdm", "--out", run, "--resume", "--steps", 2, "--grid-steps", 1,
                    "--data", project / "moved")  # the same set where it lies now: accepted
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["data_from_run"] == "../moved"


@pytest.mark.parametrize("content, words", [("{}", ["config.json", "'model'"]),
                                            (json.dumps({"model": "sdm"}), ["config.json", "'preset'"])])
def test_a_run_config_without_model_or_preset_on_resume(run, content, words):
    (run / "config.json").write_text(content)
    before = tree(run)
    one_line_error(invoke("train", "sdm", "--out", run, "--resume", "--steps", 6), *words)
    assert tree(run) == before


def test_a_sample_record_without_its_model_is_one_line(tmp_path):
    res = tmp_path / "results"
    folder = res / "run_cpu" / "samples" / "sdm"
    (folder / "masks").mkdir(parents=True)
    (folder / "samples.json").write_text(json.dumps({"preset": "cpu", "files": [
        {"index": 0, "image": "00000.png", "mask": "masks/00000.png", "mask_source": "test-1"}]}))
    from bench.io import ResultsFile
    from bench.rows import QualityRow

    ResultsFile(res / "quality.csv", QualityRow).append([{"model": "sdm", "preset": "cpu", "train_step": 4,
                                                           "run": str(res), "miou": 0.5, "timestamp": "2025"}])
    before = tree(tmp_path)
    one_line_error(invoke("report", "--results", res, "--reports", tmp_path / "rep"), "samples.json", "no model")
    assert tree(tmp_path) == before


# --- 9. damaged or older rows in results files: named by file and line, or read through a migration (issue 25) ---

TIMED = dict(timestamp="2026-01-01T00:00:00+00:00", device="cpu", device_name="Test CPU (2 threads)", threads=2,
             torch="2.x", cuda="none", precision="fp32", batch_size=1, steps=20, nfe=20, commit="abc123",
             mode="timed", status="ok", preset="cpu", resolution=32, compile=False, params=3000000,
             flops_per_nfe=1.0e9)
NFE_SECONDS = {"sisma": 0.0312, "dit": 0.0277}


def speed_rows() -> list[dict]:
    """Timed rows of two models, as `bench speed` writes them (the columns a report reads)."""
    return [dict(TIMED, model=model, latency_nfe_median_s=s, latency_nfe_iqr_s=s / 10,
                 image_latency_projected_s=s * 20, images_per_s_projected=1 / (s * 20))
            for model, s in NFE_SECONDS.items()]


def write_rows(path: Path, rows: list[dict], leave_out=()) -> Path:
    """A results CSV written by hand with the rows' columns less ``leave_out`` (as an older version wrote it)."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    names = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in leave_out]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, names, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_an_older_speed_file_without_device_name_still_gives_a_speed_section(tmp_path):
    res = tmp_path / "results"
    speed = write_rows(res / "speed.csv", speed_rows(), leave_out=("device_name", "compile", "status"))
    before = speed.read_bytes()
    result = invoke("report", "--results", res, "--reports", tmp_path / "rep", "--name", "r")
    assert result.exit_code == 0, result.output
    md = (tmp_path / "rep" / "r.md").read_text()
    assert "## Speed" in md and "### CPU, model not recorded (2 threads): fp32" in md, md
    assert "torch.compile off" in md and "31.2 ms" in md and "27.7 ms" in md
    assert speed.read_bytes() == before  # read through the migration; the file itself is left as it was


def test_an_append_to_an_older_speed_file_keeps_its_rows_and_its_report(tmp_path):
    import csv

    from bench.io import ResultsFile
    from bench.rows import SpeedRow

    res = tmp_path / "results"
    speed = write_rows(res / "speed.csv", speed_rows(), leave_out=("device_name",))
    with speed.open(newline="") as f:
        old = list(csv.DictReader(f))
    ResultsFile(speed, SpeedRow).append([dict(speed_rows()[0], model="sdm", timestamp="2026-01-02T00:00:00+00:00")])
    with speed.open(newline="") as f:
        now = list(csv.DictReader(f))
    assert [{k: r[k] for k in old[0]} for r in now[:2]] == old  # the older rows kept, field for field
    assert set(now[0]) == set(SpeedRow.__dataclass_fields__)  # under today's full header
    rows = ResultsFile(speed, SpeedRow).read()
    assert list(rows["model"]) == ["sisma", "dit", "sdm"]
    assert list(rows["device_name"]) == ["CPU, model not recorded (2 threads)"] * 2 + ["Test CPU (2 threads)"]


def damage(path: Path, how: str) -> str:
    """Damage the last row of ``path`` as ``how`` says; returns the words the error must hold."""
    text = path.read_text()
    rows = text.splitlines()
    header = rows[0].split(",")
    if how == "text in a number":
        cells = rows[-1].split(",")
        cells[header.index("latency_nfe_median_s")] = "fast"
        path.write_text("\n".join(rows[:-1] + [",".join(cells)]) + "\n")
        return "column 'latency_nfe_median_s' holds 'fast' where a number belongs"
    if how == "cut short":
        path.write_text(text[: -len(rows[-1]) // 2])  # what a writer killed mid-line leaves
        return "where the header has"
    if how == "open quote":
        path.write_text(text + '"sisma,unfinished\n')
        return "not valid CSV"
    cells = rows[-1].split(",")
    cells[header.index("model")] = ""
    path.write_text("\n".join(rows[:-1] + [",".join(cells)]) + "\n")
    return "column 'model' is empty"


@pytest.mark.parametrize("how", ["text in a number", "cut short", "open quote", "empty model"])
def test_a_damaged_speed_row_is_named_by_file_and_line(tmp_path, how):
    res = tmp_path / "results"
    speed = write_rows(res / "speed.csv", speed_rows())
    words = damage(speed, how)
    line = len(speed_rows()) + (2 if how == "open quote" else 1)  # the header is line 1
    before = tree(tmp_path)
    one_line_error(invoke("report", "--results", res, "--reports", tmp_path / "rep"),
                   f"speed.csv line {line}", words, f"fix or delete line {line}")
    one_line_error(invoke("speed", "--flops-only", "--preset", "tiny", "--models", "sdm", "--out", speed),
                   f"speed.csv line {line}")  # refused before any work, not appended to
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name, row, column, number", [
    ("quality.csv", dict(model="sisma", preset="cpu", train_step=300, miou=0.5), "model", "miou"),
    ("quality_masks.csv", dict(eval_key="k", model="sisma", mask=0, inter="1 2", union="2 2"), "eval_key", "mask"),
    ("speed_rounds.csv", dict(sweep="s", process=0, round=0, model="sisma", resolution=32, batch_size=1, kind="nfe",
                              seconds=0.03), "seconds", "seconds"),
    ("lr_sweep.csv", dict(model="sisma", preset="cpu", lr=1e-3, train_steps=300, heldout_loss=0.4), "lr",
     "heldout_loss"),
])
def test_other_results_files_missing_a_column_or_holding_text(tmp_path, name, row, column, number):
    res = tmp_path / "results"
    write_rows(res / "speed.csv", speed_rows())
    other = write_rows(res / name, [row], leave_out=(column,))
    before = tree(tmp_path)
    one_line_error(invoke("report", "--results", res, "--reports", tmp_path / "rep"),
                   name, "line 1 (the header)", f"lacks column {column!r}")
    assert tree(tmp_path) == before
    write_rows(other, [row, {**row, number: "n/a"}])
    before = tree(tmp_path)
    one_line_error(invoke("report", "--results", res, "--reports", tmp_path / "rep"),
                   f"{name} line 3", f"column {number!r} holds 'n/a' where a number belongs")
    assert tree(tmp_path) == before


def test_an_append_that_would_migrate_a_damaged_older_file_writes_nothing(tmp_path):
    from bench.errors import BenchError
    from bench.io import ResultsFile
    from bench.rows import SpeedRow

    speed = write_rows(tmp_path / "speed.csv", speed_rows(), leave_out=("device_name",))
    damage(speed, "cut short")
    before = speed.read_bytes()
    with pytest.raises(BenchError, match="speed.csv line 3: .* where the header has"):
        ResultsFile(speed, SpeedRow).append(speed_rows())  # the header migration would rewrite the cut row
    assert speed.read_bytes() == before


def test_a_read_only_results_folder_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import errno

    from bench.io import ResultsFile

    def read_only(self):  # the first write into the results folder: the file lock beside speed.csv
        raise OSError(errno.EROFS, os_strerror(errno.EROFS), str(self.path.with_name(f".{self.path.name}.lock")))

    monkeypatch.setattr(ResultsFile, "_lock", read_only)
    out = tmp_path / "results" / "speed.csv"
    one_line_error(invoke("speed", "--flops-only", "--preset", "tiny", "--models", "sdm", "--resolutions", 16,
                          "--out", out), "speed.csv.lock", "read-only", "give a writable folder")
    assert not out.exists()


@pytest.mark.parametrize("blocked, words", [("file", ["a part of the path is a file"]),
                                            ("forbidden", ["permission denied"])])
def test_weights_fetch_into_an_unwritable_dest_is_one_line(tmp_path, monkeypatch, blocked, words):
    import errno

    from bench import weights

    monkeypatch.setenv("SIS_BENCH_OFFLINE", "0")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    dest = tmp_path / "dest"
    if blocked == "file":
        dest.write_text("a file where the folder goes")
    else:  # a folder this account may not write to (root ignores modes, so the refusal is injected)
        mkdir = Path.mkdir

        def forbidden(self, *args, **kwargs):
            if dest in (self, *self.parents):
                raise PermissionError(errno.EACCES, os_strerror(errno.EACCES), str(self))
            return mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", forbidden)
    monkeypatch.setattr(weights, "download", lambda *a, **k: pytest.fail("fetched into an unwritable folder"))
    before = tree(tmp_path)
    one_line_error(invoke("weights", "fetch", "inception", "--dest", dest), "dest", *words)
    assert tree(tmp_path) == before
