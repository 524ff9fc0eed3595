"""One rank launcher for the training stages: SFT or GRPO in N data-parallel ranks under `torch.distributed.run`.

The pipeline stays one process (the teacher, the cache and W&B live in it); only a training stage
fans out. The driver writes the stage's arguments to `<out_dir>/launch.json` and runs
`python -m torch.distributed.run <rank_args> -m stat_exp.student.launch <spec>`; every rank
trains (accelerate reads RANK, WORLD_SIZE and MASTER_ADDR from torchrun: gloo on CPUs, NCCL on
GPUs) and rank 0 writes `summary.json`, which the driver returns.

torchrun rather than `accelerate launch`: accelerate fans out only where it sees several GPUs
(or with `--multi_gpu`, which on a CPU fails), so `--num_processes 2` trains one process on a CPU;
torchrun starts N ranks wherever it runs, and accelerate inside each rank still does the rest.

When the SLURM job spans nodes (SLURM_NNODES > 1), the driver runs one torchrun per node through
`srun`; each takes its node rank, the main address and the port from its own SLURM environment
(`rank_args`).
"""

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from stat_exp.config import ModelConfig, RLConfig, SFTConfig
from stat_exp.student.grpo import train_grpo
from stat_exp.student.sft import train_sft

logger = logging.getLogger(__name__)

SPEC = "launch.json"  # the stage's arguments, in its output folder
SUMMARY = "summary.json"  # rank 0's result, in the same folder
_PORT_BASE = 20000  # rendezvous ports 20000..29999, chosen by job id so that jobs sharing a node differ
_PORTS = 10000

# The stages that fan out: name -> (training function, its config dataclass).
STAGES: dict[str, tuple[Callable[..., dict], type]] = {"sft": (train_sft, SFTConfig), "grpo": (train_grpo, RLConfig)}


def slurm_hostnames(nodelist: str) -> list[str]:
    """The hosts of a SLURM node list (`node[01-03]`), as `scontrol show hostnames` expands it."""
    result = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
    return result.stdout.split()


def rank_args(num_processes: int, env: Mapping[str, str],
              hostnames: Callable[[str], list[str]] = slurm_hostnames) -> list[str]:
    """torchrun's arguments for `num_processes` ranks on this node, from the (SLURM) environment `env`.

    One node: `--standalone` (torchrun picks a free port itself). A job over SLURM_NNODES > 1 nodes:
    node rank SLURM_NODEID, the main address the first host of SLURM_JOB_NODELIST, and a port
    from SLURM_JOB_ID (MASTER_PORT when set), the same on every node of the job.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be at least 1, got {num_processes}")
    nodes = int(env.get("SLURM_NNODES", "1"))
    if nodes == 1:
        return ["--standalone", f"--nproc_per_node={num_processes}"]
    missing = [name for name in ("SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID") if name not in env]
    if missing:
        raise ValueError(f"SLURM_NNODES={nodes} but {', '.join(missing)} not set: cannot place the ranks' nodes")
    port = env.get("MASTER_PORT") or str(_PORT_BASE + int(env["SLURM_JOB_ID"]) % _PORTS)
    return [
        f"--nnodes={nodes}",
        f"--node_rank={env['SLURM_NODEID']}",
        f"--master_addr={hostnames(env['SLURM_JOB_NODELIST'])[0]}",
        f"--master_port={port}",
        f"--nproc_per_node={num_processes}",
    ]


def node_command(num_processes: int, spec: Path, env: Mapping[str, str]) -> list[str]:
    """torchrun starting this node's `num_processes` ranks of the stage in `spec`."""
    return [sys.executable, "-m", "torch.distributed.run", *rank_args(num_processes, env),
            "-m", "stat_exp.student.launch", str(spec)]


def launch_command(num_processes: int, spec: Path, env: Mapping[str, str]) -> list[str]:
    """The driver's command: torchrun here, or on a job over several nodes one torchrun per node
    through `srun` (each computes its own `rank_args` from its node's environment)."""
    nodes = int(env.get("SLURM_NNODES", "1"))
    if nodes == 1:
        return node_command(num_processes, spec, env)
    return ["srun", "--overlap", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
            sys.executable, "-m", "stat_exp.student.launch", "--node", str(num_processes), str(spec)]


def write_spec(stage: str, model_path: str, rows: Sequence[dict], cfg: Any, out_dir: Path, *,
               model_cfg: ModelConfig, options: Mapping[str, Any] | None = None) -> Path:
    """Writes `out_dir/launch.json`, all that a rank needs to train `stage`; returns its path."""
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; choose one of {', '.join(STAGES)}")
    spec = out_dir / SPEC
    spec.write_text(json.dumps({
        "stage": stage, "model_path": model_path, "rows": list(rows), "out_dir": str(out_dir),
        "cfg": OmegaConf.to_container(OmegaConf.structured(cfg)),
        "model_cfg": OmegaConf.to_container(OmegaConf.structured(model_cfg)),
        "options": dict(options or {}),
    }))
    return spec


def launch(stage: str, num_processes: int, model_path: str, rows: Sequence[dict], cfg: Any, out_dir: Path, *,
           model_cfg: ModelConfig, options: Mapping[str, Any] | None = None) -> dict:
    """Runs training stage `stage` (a name in STAGES) in `num_processes` ranks per node; returns rank 0's summary.

    `options` are the stage function's other keyword arguments (JSON values). The ranks log their
    curves to the console; W&B stays with the driver, which logs the returned summary.
    """
    spec = write_spec(stage, model_path, rows, cfg, out_dir, model_cfg=model_cfg, options=options)
    command = launch_command(num_processes, spec, os.environ)
    logger.info("%s in %d ranks per node: %s", stage, num_processes, " ".join(command))
    subprocess.run(command, check=True)
    summary = json.loads((out_dir / SUMMARY).read_text())
    # The artifact keeps what the stage made: the rows are the data artifact's, the summary goes into its manifest.
    spec.unlink()
    (out_dir / SUMMARY).unlink()
    return summary


def run_rank(spec_path: Path) -> None:
    """The body of one rank (torchrun sets RANK and WORLD_SIZE): train the stage in `spec_path`; rank 0
    writes the summary, with the number of ranks that trained."""
    spec = json.loads(spec_path.read_text())
    train, config_class = STAGES[spec["stage"]]
    out_dir = Path(spec["out_dir"])
    summary = train(
        model_path=spec["model_path"],
        rows=spec["rows"],
        cfg=OmegaConf.merge(OmegaConf.structured(config_class), spec["cfg"]),
        out_dir=out_dir,
        model_cfg=OmegaConf.merge(OmegaConf.structured(ModelConfig), spec["model_cfg"]),
        **spec["options"],
    )
    if os.environ["RANK"] == "0":
        partial = out_dir / (SUMMARY + ".partial")
        partial.write_text(json.dumps({**summary, "ranks": int(os.environ["WORLD_SIZE"])}))
        os.replace(partial, out_dir / SUMMARY)  # the driver reads it whole or not at all


def main(argv: Sequence[str]) -> None:
    """`-m stat_exp.student.launch SPEC`: one rank (under torchrun); `--node N SPEC`: this node's torchrun."""
    if argv[0] == "--node":
        os.execv(sys.executable, node_command(int(argv[1]), Path(argv[2]), os.environ))
    run_rank(Path(argv[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
