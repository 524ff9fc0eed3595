"""Shared by the tests: the repository's paths and the real config, composed with overrides."""

from pathlib import Path

from hydra import compose, initialize_config_dir

from stat_exp.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def compose_config(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))
