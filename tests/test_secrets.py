"""Secrets never written: a STAT run with canary values in secret-named config keys and in the
environment, then every file the run, the artifact cache and W&B wrote is searched for them."""

from pathlib import Path

import pytest

from helpers import run_cli
from test_stat import ScriptedTeacher, math_like_data  # noqa: F401 (a fixture)
from teacher_server import TeacherServer

# Canaries in config keys that name a secret (through a free-form mapping of the schema).
CONFIG_SECRETS = {"hf_token": "CANARY-cfg-hf-token", "aws_secret_access_key": "CANARY-cfg-aws",
                  "private_key": "CANARY-cfg-private", "client_secret": "CANARY-cfg-client",
                  "credentials": "CANARY-cfg-credentials", "db_password": "CANARY-cfg-password"}
ENV_SECRETS = {"OPENAI_API_KEY": "CANARY-env-openai", "WANDB_API_KEY": "CANARY-env-wandb-0123456789abcdef01234567",
               "HF_TOKEN": "CANARY-env-hf", "STAT_TEACHER_KEY": "CANARY-env-teacher"}


def written_files(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]


@pytest.mark.slow  # a whole STAT run through the CLI, about a minute on 2 cores
def test_canary_secrets_reach_no_file_the_run_cache_or_wandb_wrote(tmp_path, math_like_data):  # noqa: F811
    wandb_home = tmp_path / "wandb_home"
    env = ENV_SECRETS | {"WANDB_DIR": str(wandb_home), "WANDB_CONFIG_DIR": str(wandb_home / "config"),
                         "WANDB_CACHE_DIR": str(wandb_home / "cache"), "WANDB_DATA_DIR": str(wandb_home / "data")}
    secret_overrides = [f"+task.benchmarks.math500.fields.{k}={v}" for k, v in CONFIG_SECRETS.items()]
    with TeacherServer(ScriptedTeacher()) as server:
        printed = run_cli(
            "variant=sel", "data.budget=8", "difficulty=outcome", "difficulty.max_tokens=8",
            "difficulty.test_benchmark=null", "eval.benchmarks=[math500]", "eval.limit=2", "eval.max_tokens=8",
            f"task.data_dir={math_like_data}", "task.val_size=6", "task.skills.catalogue_file=skills.json",
            "teacher=local", f"teacher.api_base={server.url}", "teacher.model=openai/scripted",
            "teacher.api_key_env=STAT_TEACHER_KEY", "logger.mode=offline",
            "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.tokenizer_corpus_size=200",
            *secret_overrides,
            f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
            env=env, timeout=300,
        )
    assert server.api_keys == {"CANARY-env-teacher"}  # the teacher's key was read, and sent only to the server
    files = written_files(tmp_path / "run", tmp_path / "cache", wandb_home)
    assert any(p.name.endswith(".wandb") for p in files) and any(p.name == "teacher.sqlite" for p in files)
    assert (tmp_path / "run" / "config.yaml").read_text().count("'***'") >= len(CONFIG_SECRETS)
    canaries = [*CONFIG_SECRETS.values(), *ENV_SECRETS.values()]
    leaks = [(str(p.relative_to(tmp_path)), c) for p in files for c in canaries if c.encode() in p.read_bytes()]
    leaks += [("stdout/stderr", c) for c in canaries if c in printed]
    assert leaks == []
    # The run is named after its overrides, with the secret ones masked (metrics.json and W&B).
    assert "+task.benchmarks.math500.fields.hf_token=***" in (tmp_path / "run" / "metrics.json").read_text()
