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

import pytest
from test_sft import MODEL, ROWS, small, weights

from stat_exp import evaluate as evaluation
from stat_exp.config import EvalConfig, GeneratorConfig, SFTConfig
from stat_exp.store import Store
from stat_exp.student import generation
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
Store(Path(root)).stage("sft", config=spec["cfg"], code={},
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


QUESTIONS = [{"id": f"q{i}", "problem": f"What is {i}+{i + 1}?", "answer": str(2 * i + 1)} for i in range(10)]
GENERATOR = GeneratorConfig(batch_size=2, device="cpu", shard_size=3)  # shards of 3, 3, 3 and 1 questions


class Killed(Exception):
    """Stands for the kill that stops a probe in the middle of its generation."""


def probe_stage(store: Store, model_dir: Path, generated: list[int], kill_at_call: int | None = None) -> object:
    """A probe stage (2 samples at temperature 1) whose generator counts the questions of each
    call, and raises at call `kill_at_call`."""
    real = generation.make_generator

    class Counting:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def generate(self, prompts, **kwargs):
            if len(generated) + 1 == kill_at_call:
                raise Killed
            generated.append(len(prompts))
            return self.inner.generate(prompts, **kwargs)

    def compute(out: Path) -> dict:
        records = evaluation.answer_and_grade(
            QUESTIONS, out, model_path=str(model_dir), model_cfg=MODEL, gen_cfg=GENERATOR, eval_cfg=EvalConfig(),
            samples=2, temperature=1.0, top_p=1.0, max_tokens=6, seed=0)
        return evaluation.summarize(records)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generation, "make_generator", Counting)
        return store.stage("probe", config={}, code={}, compute=compute)


def test_killed_probe_keeps_its_shards_and_the_rerun_generates_only_the_rest(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    store, generated = Store(tmp_path / "cache"), []
    with pytest.raises(Killed):
        probe_stage(store, tiny_model_dir, generated, kill_at_call=3)
    assert generated == [3, 3]
    (unfinished,) = (tmp_path / "cache" / "probe").iterdir()
    assert sorted(p.name for p in (unfinished / "shards").iterdir()) == ["0000.jsonl", "0001.jsonl"]

    resumed = probe_stage(store, tiny_model_dir, generated)
    assert generated == [3, 3, 3, 1]  # the rerun answered only the 4 questions of the missing shards
    assert not (resumed.path / "shards").exists()  # rows.jsonl holds them all

    whole_calls: list[int] = []
    whole = probe_stage(Store(tmp_path / "whole"), tiny_model_dir, whole_calls)
    assert whole_calls == [3, 3, 3, 1]
    assert resumed.rows() == whole.rows() and [r["id"] for r in resumed.rows()] == [q["id"] for q in QUESTIONS]
    assert resumed.summary == whole.summary
    responses = [r["responses"] for r in whole.rows()]
    assert len({tuple(pair) for pair in responses}) > 1  # sampled text, so the seeds had to match


def test_shard_seeds_never_share_a_batch_seed() -> None:
    # hf seeds batch b of a shard with shard_seed + b, b < shard_size
    seeds = [evaluation.shard_seed(7, index, 4) + batch for index in range(5) for batch in range(4)]
    assert evaluation.shard_seed(7, 0, 4) == 7 and len(set(seeds)) == len(seeds) == 20
