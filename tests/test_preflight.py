"""Preflight: everything a run lacks on this machine, in one message with the overrides, before any stage."""

import os
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT, SHARED_DATA, compose_config
from stat_exp.preflight import Machine, Missing, check, report
from teacher_server import TeacherServer

BARE = Machine(gpu=False, hub=False, vllm=False)  # this CI machine: no GPU, no hub, no vLLM
GPU_BOX = Machine(gpu=True, hub=True, vllm=True)


def never_called(body: dict) -> str:
    raise AssertionError(f"preflight sent a request: {body}")


def run_mission(tmp_path, *overrides: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m stat_exp ...` as a user runs it: no OpenAI key, the hub offline."""
    environ = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "WANDB_API_KEY")}
    environ |= {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", **env}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "stat_exp", *overrides, f"paths.cache_dir={tmp_path / 'cache'}",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=environ, capture_output=True,
                         text=True, timeout=120)
    return out, time.monotonic() - start


@pytest.mark.slow
def test_the_missions_command_lists_what_is_missing_and_stops(tmp_path):
    # Any request to OpenAI would reach this server instead, and fail the test.
    with TeacherServer(never_called) as server:
        out, seconds = run_mission(tmp_path, "variant=syn", "model=qwen", OPENAI_BASE_URL=server.url,
                                   OPENAI_API_BASE=server.url)
        assert server.requests == 0
    printed = out.stdout + out.stderr
    assert out.returncode == 1 and seconds < 60, printed
    assert "Traceback" not in printed
    for needed, override in [("OPENAI_API_KEY", "teacher=local teacher.api_base="),
                             ("RLHFlow/Llama3.1-8B-PRM-Mistral-Data on a GPU: this machine has none", "-> difficulty=outcome"),
                             ("sft=qlora loads Qwen/Qwen2.5-3B in 4 bits", "-> sft=lora"),
                             ("the student Qwen/Qwen2.5-3B is on the hub, which HF_HUB_OFFLINE forbids", "model.hub_id="),
                             ("math-train, math-val, math, amc23, aime24: on the hub", "-> task.data_dir=../shared/data"),
                             ("math2, gsm8k, aime25: on the hub", "-> eval.benchmarks=[math,amc23,aime24]")]:
        assert needed in printed and override in printed, (needed, printed)
    assert "7 thing(s) missing" in printed
    assert not (tmp_path / "cache").exists()  # no stage ran, nothing cached


@pytest.mark.slow
def test_a_paper_teacher_without_its_key_is_named(tmp_path):
    out, seconds = run_mission(tmp_path, "variant=sel", "model=tiny", "teacher=gpt-4o-mini", "difficulty=outcome",
                               "task.data_dir=../shared/data")
    assert out.returncode == 1 and seconds < 60 and "Traceback" not in out.stderr, out.stderr
    assert "teacher=gpt-4o-mini (openai/gpt-4o-mini, openai/gpt-4o) needs OPENAI_API_KEY, which is not set" in out.stderr
    assert not (tmp_path / "cache").exists()


@pytest.fixture
def perturb_dir(tmp_path):
    """A data_dir holding only MATH-Perturb (released on GitHub, not on the hub): the rest loads from the hub."""
    (tmp_path / "math_perturb").mkdir()
    for split in ("simple", "hard"):
        (tmp_path / "math_perturb" / f"{split}.jsonl").write_text('{"problem": "1+1?", "answer": "2"}\n')
    return tmp_path


def test_the_paper_recipe_needs_nothing_more_on_a_gpu_machine_with_the_key(monkeypatch, perturb_dir):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert check(compose_config("variant=syn", "model=qwen", "generator=vllm", f"task.data_dir={perturb_dir}"),
                 GPU_BOX) == []
    [missing] = check(compose_config("variant=syn", "model=qwen"), GPU_BOX)  # no MATH-Perturb files
    assert missing.what == "math_perturb_simple, math_perturb_hard: no hub copy, and no task.data_dir"
    assert missing.fix == ("eval.benchmarks=[math,math2,gsm8k,amc23,aime24,aime25] (or task.data_dir=a folder "
                           "that holds math_perturb/simple.jsonl, math_perturb/hard.jsonl)")


def test_the_missing_key_alone_with_everything_else_present(monkeypatch, perturb_dir):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    [missing] = check(compose_config("variant=sel", "model=qwen", f"task.data_dir={perturb_dir}"), GPU_BOX)
    assert "OPENAI_API_KEY" in missing.what and "teacher=oracle" in missing.fix


def test_each_gpu_need_with_its_override(monkeypatch, perturb_dir):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    cfg = compose_config("variant=sel", "model=qwen", "generator=vllm", f"task.data_dir={perturb_dir}")
    fixes = [m.fix for m in check(cfg, Machine(gpu=False, hub=True, vllm=False))]
    assert fixes == ["difficulty=outcome", "sft=lora", "generator=hf, or pip install -e '.[vllm]'", "generator=hf"]
    # The overrides it names make the run possible on this machine.
    cfg = compose_config("variant=sel", "model=qwen", "difficulty=outcome", "sft=lora", "generator=hf",
                         f"task.data_dir={perturb_dir}")
    assert check(cfg, Machine(gpu=False, hub=True, vllm=False)) == []


def test_a_tiny_student_needs_no_gpu_for_its_lora_in_4_bits(monkeypatch):
    """The 4-bit check is for hub models: the tiny model falls back to fp32 LoRA on a CPU."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    cfg = compose_config("variant=sel", "model=tiny", "difficulty=outcome", f"task.data_dir={SHARED_DATA}",
                         "eval.benchmarks=[math,amc23,aime24]")
    assert cfg.sft.load_in_4bit and check(cfg, BARE) == []


def test_eval_only_and_skillworld_runs_need_nothing_here():
    assert check(compose_config("experiment=eval_tiny", f"task.data_dir={SHARED_DATA}"), BARE) == []
    assert check(compose_config("experiment=demo"), BARE) == []  # the oracle teacher needs no key


def test_a_local_teacher_server_is_checked_without_a_request():
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens on `port` now
    overrides = ["variant=sel", "difficulty=outcome", f"task.data_dir={SHARED_DATA}", "eval.benchmarks=[math]",
                 "teacher=local"]
    [missing] = check(compose_config(*overrides, f"teacher.api_base=http://127.0.0.1:{port}/v1"), BARE)
    assert missing.what == f"the teacher's server http://127.0.0.1:{port}/v1 does not answer"
    with TeacherServer(never_called) as server:
        assert check(compose_config(*overrides, f"teacher.api_base={server.url}"), BARE) == []
        assert server.requests == 0


def test_a_teachers_own_key_variable(monkeypatch):
    monkeypatch.delenv("MY_TEACHER_KEY", raising=False)
    cfg = compose_config("variant=sel", "difficulty=outcome", f"task.data_dir={SHARED_DATA}", "eval.benchmarks=[math]",
                         "teacher.api_key_env=MY_TEACHER_KEY")
    [missing] = check(cfg, BARE)
    assert missing.what.endswith("needs MY_TEACHER_KEY, which is not set")
    monkeypatch.setenv("MY_TEACHER_KEY", "sk-test")
    assert check(cfg, BARE) == []


def test_a_cached_hub_model_counts_as_present(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    cfg = compose_config("model=qwen", f"task.data_dir={SHARED_DATA}")  # eval only
    [missing] = check(cfg, BARE)
    assert missing.what.startswith("the student Qwen/Qwen2.5-3B is on the hub")
    (tmp_path / "models--Qwen--Qwen2.5-3B" / "snapshots" / "abc123").mkdir(parents=True)
    assert check(cfg, BARE) == []


def test_data_sets_neither_in_data_dir_nor_reachable(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = compose_config(f"task.data_dir={tmp_path}", "eval.benchmarks=[math500,gsm8k]")  # an empty data_dir
    hub = "on the hub, which this machine cannot reach, and not in the local cache"
    assert check(cfg, BARE) == [
        Missing(f"math-train: {hub}", "task.data_dir=a folder that holds math/train.jsonl"),
        Missing(f"math-val: {hub}", "task.data_dir=a folder that holds math/train.jsonl"),
        Missing(f"math500, gsm8k: {hub}", "eval.benchmarks=[] (or task.data_dir=a folder that holds math500/test.jsonl)"),
    ]
    assert check(cfg, Machine(gpu=False, hub=True, vllm=False)) == []


def test_the_report_lists_every_item_with_its_fix():
    text = report(check(compose_config("variant=syn", "model=qwen"), BARE))
    assert text.count("\n      -> ") == int(text.split(": ")[1].split(" ")[0])
