"""W&B's mode as users have their credentials: `wandb login` (a ~/.netrc) or WANDB_API_KEY."""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, compose_config
from stat_exp.tracking import Tracker

ASK = ("from helpers import compose_config; from stat_exp.tracking import wandb_mode; "
       "print(*wandb_mode(compose_config(*sys.argv[1:])), sep='|')")


def mode(tmp_path, netrc: str | None, *overrides: str, **env: str) -> tuple[str, str]:
    """wandb_mode in a fresh process whose home holds `netrc` (what `wandb login` writes) or nothing."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    if netrc is not None:
        (home / ".netrc").write_text(netrc)
        (home / ".netrc").chmod(0o600)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    # Silent: wandb's "logged in as" line asks the server for the user name, and with these made-up
    # credentials and no network wandb 0.31's service then holds the process at exit for minutes.
    out = subprocess.run([sys.executable, "-c", "import sys; " + ASK, *overrides], cwd=ROOT / "tests",
                         env=clean | {"HOME": str(home), "NETRC": str(home / ".netrc"), "WANDB_SILENT": "true", **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(out.stdout.strip().splitlines()[-1].split("|"))


def test_credentials_in_netrc_only_choose_online(tmp_path):
    key = "0123456789abcdef0123456789abcdef01234567"
    netrc = f"machine api.wandb.ai\n  login user\n  password {key}\n"
    assert mode(tmp_path, netrc) == ("online", "W&B credentials found (WANDB_API_KEY or `wandb login`)")


@pytest.mark.parametrize("env, expected", [({}, "offline"), ({"WANDB_MODE": "disabled"}, "disabled")])
def test_no_credentials_choose_offline_and_wandb_mode_wins(tmp_path, env, expected):
    chosen, why = mode(tmp_path, None, **env)
    assert chosen == expected and (("wandb login" in why) if expected == "offline" else why == "WANDB_MODE")


def test_logger_mode_wins_over_credentials(tmp_path):
    netrc = "machine api.wandb.ai\n  login user\n  password 0123456789abcdef0123456789abcdef01234567\n"
    assert mode(tmp_path, netrc, "logger.mode=offline") == ("offline", "logger.mode")


class LostService:
    """A W&B run whose service is gone, as when SLURM stops every process of a preempted job."""
    id = "lost"

    def log(self, metrics):
        raise ConnectionResetError("Connection lost")

    def finish(self, exit_code=0):
        raise ConnectionResetError("Connection lost")


def test_a_stopped_job_keeps_its_metrics_without_the_lost_wandb_service(tmp_path):
    tracker = Tracker(compose_config("logger=none"), tmp_path)
    tracker.wandb_run = LostService()
    with pytest.raises(ConnectionResetError):
        tracker.log({"cache/computed": 1})  # a running job that loses W&B fails loudly
    # Being stopped, nothing may raise: an error would replace the exit that lets submitit requeue.
    tracker.stopped = True
    tracker.log({"cache/computed": 2})
    assert json.loads(tracker.finish().read_text())["cache"]["computed"] == 2
