"""Shared by the tests: the repository's paths, the real config composed with overrides, and
the CLI run as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from stat_exp.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the repository; searched upwards so that a copy inside it (mutmut's mutants/) finds it too.
SHARED_DATA = next((p / "shared" / "data" for p in ROOT.parents if (p / "shared" / "data").is_dir()),
                   ROOT.parent / "shared" / "data")


def compose_config(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def run_cli(*args: str, timeout: int = 600, env: dict[str, str] | None = None) -> str:
    """`python -m stat_exp *args` from the repository root, W&B offline, with no API key and no hub
    (unless `env`, added last, sets them); fails the test unless it exits 0, else returns what it printed."""
    env = ({**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
           | {"WANDB_API_KEY": None} | (env or {}))
    env = {k: v for k, v in env.items() if v is not None}
    out = subprocess.run([sys.executable, "-m", "stat_exp", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout + out.stderr
