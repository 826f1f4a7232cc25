"""`python -m kws_lightning.stream_eval ckpt_path=CKPT [snr_db=[20,10,0]] [tune=true split=validation]`:
keyword spotting on long streams, measured as wake-word engines are.

Builds streams from a split's clips (testing by default, never training) over background noise at each
SNR (WAV + ground-truth CSV, deterministic for `seed`), runs `listen`'s detector over them with a sweep of
thresholds, and writes stream_metrics.json (miss rate at 0.5 / 1 / 2 false alarms per hour, DET area,
latency; per keyword and overall), det.png and detections.csv to the run dir. `tune=true` (on validation
streams) chooses the detector's settings and writes a copy of the checkpoint holding them, which `listen`
then uses by default. The work is in `kws_lightning/stream_bench/`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="stream_eval")
def main(cfg: DictConfig) -> float:
    from kws_lightning.stream_bench.runner import run
    from kws_lightning.utils.cli_errors import one_line_errors

    # Its settings' checks raise ValueError naming the setting: one line too.
    with one_line_errors(code=2, extra=(ValueError,)):
        metrics = run(cfg)
    return metrics["results"]["all"]["sweep"]["miss_rate_at_fa_per_hour"]["1"]


if __name__ == "__main__":
    main()
