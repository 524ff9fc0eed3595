"""`python -m stat_exp [overrides]`: one STAT experiment; `-m` for a multirun sweep.

Only Hydra and the config dataclasses are imported here: `--help` and `--cfg job` answer
without loading torch, transformers or litellm.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from stat_exp.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from stat_exp.pipeline import run
    from stat_exp.teacher.client import TeacherFatalError

    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except TeacherFatalError as err:  # a setup mistake: one line that says what to do, not a traceback
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
