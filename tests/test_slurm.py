"""Sweeps on a real one-node SLURM (tests/slurm_cluster.py) through Hydra's submitit launcher."""

import json
import re
import subprocess
import sys
import time

import pytest

import slurm_cluster
from helpers import ROOT, SHARED_DATA, run_cli

pytestmark = pytest.mark.slurm
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]
SMALL = ["experiment=eval_tiny", f"task.data_dir={SHARED_DATA}", "eval.limit=2", "eval.max_tokens=8",
         "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.tokenizer_corpus_size=200"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    except slurm_cluster.Unavailable as why:
        slurm_cluster.skip_or_fail(why)
    yield cluster
    slurm_cluster.stop(cluster)


def test_a_sweep_runs_its_jobs_on_slurm_and_summarises_them(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    printed = run_cli("-m", *SMALL, "eval.samples=1,2", *LAUNCHER, f"hydra.sweep.dir={sweep}",
                      f"paths.cache_dir={tmp_path / 'cache'}", env=cluster.env, timeout=900)
    jobs = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(2)]
    assert ["eval.samples=1" in jobs[0]["run"]["overrides"], "eval.samples=2" in jobs[1]["run"]["overrides"]] == [True] * 2
    assert "avg@2" not in jobs[0]["eval"]["base"]["math500"] and "avg@2" in jobs[1]["eval"]["base"]["math500"]
    # Each job ran as a SLURM job: submitit left its logs under the sweep folder, one per job id.
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2 and all("stage eval" in p.read_text() for p in logs)
    summary = json.loads((sweep / "summary.json").read_text())
    assert len(summary["benchmarks"]["math500"]) == 2 and "sweep summary" in printed


def test_a_preempted_job_is_requeued_resumes_and_the_sweep_completes(cluster, tmp_path):
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    env = {**cluster.env, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    args = [sys.executable, "-m", "stat_exp", "-m", *SMALL, "eval.limit=48", "eval.max_tokens=256", "eval.samples=1",
            "generator.shard_size=4",
            *LAUNCHER, "hydra.launcher.timeout_min=30", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache}"]
    sweep_process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
    # Preempt the job inside its evaluation, once a shard of it is written: the model stage is finished.
    deadline = time.monotonic() + 300
    while not list(cache.glob("eval/.tmp-*/shards/*.jsonl")):
        assert time.monotonic() < deadline and sweep_process.poll() is None, sweep_process.stdout.read()
        time.sleep(0.1)
    (job_id,) = cluster.run("squeue", "-h", "-o", "%i").split()
    cluster.run("scancel", "--signal=USR2", job_id)
    # SLURM holds a requeued job back for about two minutes (its begin time): the test starts it now.
    while cluster.run("squeue", "-h", "-j", job_id, "-o", "%T").strip() != "PENDING":
        assert time.monotonic() < deadline, cluster.log()
        time.sleep(0.2)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    output, _ = sweep_process.communicate(timeout=600)
    assert sweep_process.returncode == 0, output[-4000:] + cluster.log()

    log = (sweep / ".submitit" / job_id / f"{job_id}_0_log.out").read_text()
    assert "this job is preempted" in log and log.count("stage model") == 2
    assert re.search(r"resuming: ([1-9]|1[01]) of 12 shards of 4 questions already answered", log)  # the rest generated
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert [(s["stage"], s["status"]) for s in metrics["stages"]] == [("model", "reused"), ("eval", "computed")]
    assert metrics["eval"]["base"]["math500"]["n"] == 48
    runs = list((sweep / "0" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1  # W&B resumed the same run
    assert json.loads((sweep / "summary.json").read_text())["benchmarks"]["math500"][0]["base"] == \
        metrics["eval"]["base"]["math500"]["pass@1"]
