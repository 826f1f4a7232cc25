"""`python -m kws_lightning.cv experiment=RECIPE k=5 data.root=DIR [jobs=N] [threads=1] [out_dir=DIR]
[aggregate_only=true] [training overrides ...]`: speaker-disjoint k-fold cross-validation of a recipe.

Every fold i is trained as its own `python -m kws_lightning.train <your overrides> data.fold=i
data.num_folds=k hydra.run.dir=<out_dir>/fold_<i>` (output in `<out_dir>/fold_<i>.log`), `jobs` at a time
with `threads` CPU threads each; the folder's test list is never used, fold i's speakers are its held-out
split (`kws_lightning.data.index.assign_cv_fold`). Each finished fold is scored on its held-out split with
its best-validation checkpoint and its final weights, and the figures over folds (mean, std, 95 % interval,
the paired difference last - best, per class, pooled) go to `<out_dir>/cv_summary.{json,md}` and
`cv_folds.csv`. Run again to resume: finished folds are skipped, interrupted ones resume from their
last.ckpt. The work is in `kws_lightning/jobs/cv_*.py`.

`python -m kws_lightning.cv ensemble=[RUN_DIR,...] out_dir=DIR [ensemble_weights=best]` scores an ensemble
of finished cv runs fold by fold instead (posteriors averaged; nothing trained; `jobs/cv_ensemble.py`).

`python -m kws_lightning.cv compare=[RUN_A,RUN_B] out_dir=DIR` pairs two finished cv runs (or ensembles) fold
by fold: B - A with its 95 % interval, folds higher, pooled and per-class differences (`jobs/cv_compare.py`).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from kws_lightning.utils.sweep_job import register_resolvers

# The training config cv composes uses ${kws.sweep_job_name:} (conf/logger/tensorboard.yaml), as in train.
register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="cv")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from kws_lightning.jobs.cv_run import run_cv
    from kws_lightning.utils.cli_errors import one_line_errors

    try:
        with one_line_errors(code=2):  # CVError and the other expected errors: one line
            code = run_cv(cfg, list(HydraConfig.get().overrides.task))
    except KeyboardInterrupt:  # while scoring: the scores written so far are kept, the rest done next time
        print("cv interrupted: run the same command again to finish", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


if __name__ == "__main__":
    main()
