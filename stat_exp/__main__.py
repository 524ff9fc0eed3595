"""`python -m stat_exp [overrides]`: one STAT experiment; `-m` for a multirun sweep.

Only Hydra and the config dataclasses are imported here: `--help` and `--cfg job` answer
without loading torch, transformers or litellm.
"""

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from stat_exp.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from stat_exp.pipeline import run
    from stat_exp.preflight import require
    from stat_exp.store import IncompleteArtifact
    from stat_exp.teacher.client import BudgetExceeded, TeacherFatalError

    if int(os.environ.get("SLURM_PROCID", "0")) > 0:
        return  # a job of several nodes runs one driver, on its first task; its training ranks reach the others
    require(cfg)  # everything this machine lacks, listed before any stage runs
    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except (TeacherFatalError, IncompleteArtifact, BudgetExceeded) as err:  # the message says what to do next
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
