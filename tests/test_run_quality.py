"""`bench run`'s quality stage when a longer --steps continues the runs: checkpoints scored before are not scored
again, the new last step is."""
import csv

from bench.pipeline import Pipeline, RunOptions

STEPS = 20  # tiny: checkpoints every 10 steps; its fractions (0.5, 1) keep steps 10 and 20, then 20 and 40


def scored(results) -> list[int]:
    with (results / "quality.csv").open() as f:
        return sorted(int(r["train_step"]) for r in csv.DictReader(f))


def train_and_score(results, steps: int, said: list[str]) -> None:
    """The data, training, parser and quality stages of a tiny run of SDM, one seed."""
    pipe = Pipeline(RunOptions(preset="tiny", models=["sdm"], steps=steps, results=results), echo=said.append)
    pipe.stage_data()
    pipe.stage_train(pipe.variants[0], 0)
    if not list(pipe.dir.glob("parser-*px.pt")):
        pipe.stage_parser()
    pipe.stage_quality()


def test_a_longer_run_scores_only_its_new_checkpoints(workdir):
    results, said = workdir / "r", []
    train_and_score(results, STEPS, said)
    assert scored(results) == [STEPS // 2, STEPS]

    said.clear()
    train_and_score(results, 2 * STEPS, said)  # continues the same runs: step 4 is now a snapshot
    assert scored(results) == [STEPS // 2, STEPS, 2 * STEPS]
    assert any(f"step_{STEPS:07d}.pt: scored before" in line for line in said), said

    train_and_score(results, 2 * STEPS, said)  # nothing new: nothing scored
    assert scored(results) == [STEPS // 2, STEPS, 2 * STEPS]
