"""`python -m stat_exp [overrides]`: one STAT experiment; `-m` for a multirun sweep.

Only Hydra and the config dataclasses are imported here: `--help` and `--cfg job` answer
without loading torch, transformers or litellm.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from stat_exp.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from stat_exp.pipeline import run
    from stat_exp.preflight import require

    require(cfg)  # everything this machine lacks, listed before any stage runs
    run(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
