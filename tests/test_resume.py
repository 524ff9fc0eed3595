"""Stages that survive being killed: a rerun resumes training from the last checkpoint and
generation from the finished shards, and ends where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from test_sft import MODEL, ROWS, small, weights

from stat_exp.config import SFTConfig
from stat_exp.store import Store
from stat_exp.student.sft import train_sft

# The SFT stage as the pipeline runs it: train_sft inside the store's stage, in its own process.
SFT_STAGE = """
import json, logging, sys
from pathlib import Path
from stat_exp.config import ModelConfig, SFTConfig
from stat_exp.store import Store
from stat_exp.student.sft import train_sft

logging.basicConfig(level=logging.INFO)
model_dir, root, spec = sys.argv[1:]
spec = json.loads(Path(spec).read_text())
cfg, model_cfg = SFTConfig(**spec["cfg"]), ModelConfig(name="tiny", dtype="float32")
Store(Path(root)).stage("sft", config=spec["cfg"], version="1",
                        compute=lambda out: train_sft(model_dir, spec["rows"], cfg, out, model_cfg=model_cfg))
"""

STEPS = 12  # 8 rows in batches of 4: 6 epochs
RESUME_ATOL = 1e-6  # fp32 on one CPU: the resumed run repeats the same arithmetic (measured: bit-identical)


def resumable() -> SFTConfig:
    # Dropout on, so that restoring the RNG state matters as much as the optimizer's and the data position.
    return small(max_steps=STEPS, save_steps=2, save_total_limit=2, learning_rate=3e-3, lora_dropout=0.1)


def run_stage(model_dir: Path, root: Path, spec: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-c", SFT_STAGE, str(model_dir), str(root), str(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_sft_stage_resumes_from_its_last_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = resumable()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"cfg": asdict(cfg), "rows": ROWS}))
    root = tmp_path / "cache"

    killed = run_stage(tiny_model_dir, root, spec)
    deadline = time.monotonic() + 120
    while not list(root.glob("sft/.tmp-*/checkpoints/checkpoint-*/trainer_state.json")):
        assert killed.poll() is None, killed.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 2 minutes"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)  # as the OOM killer or a preemption would, with no chance to clean up
    killed.wait()
    (unfinished,) = (root / "sft").iterdir()
    assert unfinished.name.startswith(".tmp-")  # not finished: no artifact a rerun would trust
    steps = sorted(int(p.name.split("-")[1]) for p in (unfinished / "checkpoints").glob("checkpoint-*"))
    assert steps and steps[-1] < STEPS  # killed mid-training

    rerun = run_stage(tiny_model_dir, root, spec)
    log = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, log[-3000:]
    resumed = [line for line in log.splitlines() if "resumed from step" in line]
    assert len(resumed) == 1 and int(resumed[0].split("resumed from step ")[1].split()[0]) in steps
    (artifact,) = (root / "sft").iterdir()
    assert not artifact.name.startswith(".") and (artifact / "manifest.json").exists()
    assert not (artifact / "checkpoints").exists()  # the finished artifact holds no checkpoints
    assert json.loads((artifact / "manifest.json").read_text())["summary"]["steps"] == STEPS

    whole = tmp_path / "uninterrupted"
    train_sft(str(tiny_model_dir), ROWS, cfg, whole, model_cfg=MODEL)
    expected, got = weights(whole / "model" / "model.safetensors"), weights(artifact / "model" / "model.safetensors")
    base = weights(tiny_model_dir / "model.safetensors")
    differences = {name: (got[name] - expected[name]).abs().max().item() for name in expected}
    assert max(differences.values()) <= RESUME_ATOL, differences
    assert any(not base[name].equal(got[name]) for name in base)  # and training did move the weights
