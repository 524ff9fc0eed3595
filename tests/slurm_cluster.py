"""A real one-node SLURM for the tests: Debian's slurmctld, slurmd and munge, with a config of
its own (its own ports, state folders, munge socket and SLURM_CONF), so that it never touches a
SLURM already on the machine. Installs the packages when they are missing and this is root.
"""

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
DAEMONS = ["munged", "slurmctld", "slurmd", "sinfo", "sbatch"]


class Unavailable(RuntimeError):
    """SLURM cannot be started here (not root, or no Debian packages): the reason says which."""


@dataclass
class Cluster:
    root: Path
    env: dict  # the environment every SLURM client call needs: SLURM_CONF points at our config

    def run(self, *args: str) -> str:
        return subprocess.run(args, env=self.env, check=True, capture_output=True, text=True, timeout=60).stdout

    def log(self) -> str:
        return "".join((self.root / name).read_text(errors="replace")[-3000:] for name in
                       ("slurmctld.log", "slurmd.log") if (self.root / name).exists())


def skip_or_fail(why: Unavailable) -> None:
    if os.environ.get("CI") == "true":  # CI's machines can run SLURM: not running it is a failure there
        pytest.fail(f"SLURM could not be started in CI: {why}")
    pytest.skip(f"SLURM could not be started: {why}")


def ensure_packages() -> None:
    if all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable("SLURM is not installed, and installing it needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise Unavailable(f"{' '.join(command)} failed: {done.stderr[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(root: Path, node: str) -> str:
    cpus = os.cpu_count() or 1
    memory_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    return f"""\
ClusterName=statexp
SlurmctldHost={node}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={node} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def start(root: Path, timeout: float = 60) -> Cluster:
    """munged, slurmctld and slurmd on this machine, configured under `root`; the node idle."""
    ensure_packages()
    if os.geteuid() != 0:
        raise Unavailable("the test cluster runs its daemons as root (SlurmUser=root)")
    root = Path(root)
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (root / "slurm.conf").write_text(_config(root, socket.gethostname()))
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    subprocess.run(["munged", "--force", f"--socket={root}/munge.socket", f"--key-file={key}",
                    f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                    f"--seed-file={root}/munged.seed"], env=env, check=True, timeout=30)
    subprocess.run(["slurmctld", "-c"], env=env, check=True, timeout=30)
    subprocess.run(["slurmd"], env=env, check=True, timeout=30)
    cluster = Cluster(root, env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()
        if state == "idle":
            return cluster
        time.sleep(0.5)
    stop(cluster)
    raise Unavailable(f"the node did not come up idle within {timeout:.0f} s (state {state!r}):\n{cluster.log()}")


def stop(cluster: Cluster) -> None:
    subprocess.run(["scancel", "--full", "--user=root"], env=cluster.env, capture_output=True, timeout=30)
    for daemon in ("slurmd", "slurmctld", "munged"):
        pid_file = cluster.root / f"{daemon}.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), 15)
            except (ProcessLookupError, ValueError):
                pass  # already gone
