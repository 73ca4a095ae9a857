"""Score checkpoints of the committed study with the call `bench run`'s quality stage makes.

The pipeline's quality stage scores every snapshot of every run in one loop. This script makes the same call,
``bench.quality.evaluate_run``, with the same arguments (`bench/pipeline.py`, ``Pipeline.stage_quality``: the
preset's budget, the recipe's guidance, the run's snapshot steps, the study's parser), for the checkpoints named, the
final step first, and appends the rows to the study's ``quality.csv`` and ``quality_masks.csv``. It is how the
checkpoints the quality stage had no time for were scored (see README.md beside this file).

Run it from the repository root, where the study's run folders hold their checkpoints (checkpoints are not kept in
git: they exist only where the study was trained):

    python results/study-cpu/score.py --models sisma:scan=raster,sisma:conv=causal1d --seeds 0,1,2 --threads 2

``--steps 600,300`` scores only those snapshots; ``--train-steps`` is the ``--steps`` the study's ``bench run`` was
given, if any (it decides the snapshot steps); ``--snapshot-masks 0`` scores the snapshots on every test mask, as the
budget of the study's first session did.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from bench import presets
from bench.io import folder_lock
from bench.pipeline import QUALITY_BATCH, SAMPLE_SEED, Pipeline, RunOptions
from bench.weights import set_offline

STUDY = Path("results/study-cpu")
MODELS = ("sisma,sisma:scan=raster:conv=causal1d,sisma:scan=raster,sisma:conv=causal1d,dit,dit:cond=add,sdm,"
          "sisma:scan=bidirectional,sisma:scan=bidirectional:conv=causal1d")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=MODELS, help="variants, comma-separated (default: the study's nine)")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    ap.add_argument("--steps", default=None, help="snapshot steps to score (default: every one, the final first)")
    ap.add_argument("--train-steps", type=int, default=None, help="the --steps the study's bench run was given")
    ap.add_argument("--snapshot-masks", type=int, default=None, help="test masks scored at the earlier snapshots")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--results", type=Path, default=STUDY, help="the study's results folder")
    ap.add_argument("--preset", default="cpu", help="the study's preset")
    ap.add_argument("--offline", action="store_true", help="fetch no weights (as bench run --offline)")
    args = ap.parse_args()
    if args.offline:
        set_offline()

    import torch

    from bench.quality import append_rows, evaluate_run, find_resources
    from bench.runtime import set_threads

    opts = RunOptions(preset=args.preset, models=args.models.split(","), seeds=[int(s) for s in args.seeds.split(",")],
                      steps=args.train_steps, results=args.results)
    pipe = Pipeline(opts)
    if args.snapshot_masks is not None:
        pipe.budget = dataclasses.replace(pipe.budget, quality_snapshot_masks=args.snapshot_masks)
    set_threads(args.threads)
    wanted = {int(s) for s in args.steps.split(",")} if args.steps else None
    b, out = pipe.budget, pipe.results / "quality.csv"
    resources = find_resources(None, None, set())
    with folder_lock(pipe.dir, "a bench run's results", "wait for that bench run to finish"):
        for v in pipe.variants:
            size, guidance = pipe.sizes[v.name], presets.recipe(opts.preset, v.model).guidance
            steps = sorted(pipe.snapshot_steps(v), reverse=True)  # the final checkpoint first
            final = steps[0]
            for seed in opts.seeds:
                run = pipe.run_dir(v, seed)
                for step in steps:
                    checkpoint = run / "checkpoints" / f"step_{step:07d}.pt"
                    if (wanted is not None and step not in wanted) or not checkpoint.is_file():
                        continue
                    row, masks = evaluate_run(run, pipe.data_dir(size), resources, pipe.dir / f"parser-{size}px.pt",
                                              torch.device(pipe.device), batch_size=QUALITY_BATCH, progress=True,
                                              checkpoint=checkpoint, split="test",
                                              n_masks=b.quality_masks if step == final else pipe.snapshot_masks(),
                                              samples_per_mask=b.quality_samples, steps=b.quality_steps,
                                              guidance=guidance, seed=SAMPLE_SEED, precision=pipe.precision(v))
                    append_rows(out, [row], masks)
                    print(f"{v.name} seed {seed} step {row['train_step']}: mIoU {row['miou']:.4f}")


if __name__ == "__main__":
    main()
