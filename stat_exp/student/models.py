"""Build the tiny local student, load hub students, and format their zero-shot prompts.

torch and transformers are imported inside functions so that the CLI starts fast.
"""

from pathlib import Path
from typing import Any, Sequence

from stat_exp.config import TinyModelConfig

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Qwen's ChatML layout, without Qwen's default system prompt or tool handling.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_tiny_model(cfg: TinyModelConfig, corpus: Sequence[str], out_dir: Path) -> None:
    """Train a byte-level BPE tokenizer on `corpus`, build a seeded Qwen2 of `cfg`'s sizes, save both."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2Tokenizer,
    )

    special_tokens = [EOS_TOKEN, PAD_TOKEN, IM_START, IM_END]
    # AutoTokenizer loads every qwen2 checkpoint as Qwen2Tokenizer, which rebuilds its own normalizer and
    # pre-tokenizer around the saved vocab and merges: train with that same pipeline so that the reloaded
    # tokenizer splits text exactly as the trained one did.
    qwen_pipeline = Qwen2Tokenizer().backend_tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = qwen_pipeline.normalizer
    bpe.pre_tokenizer = qwen_pipeline.pre_tokenizer
    bpe.decoder = qwen_pipeline.decoder
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=special_tokens,
        # Every byte is in the vocabulary, so any text (unseen digits, LaTeX, unicode) encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, IM_END],  # v5 name of additional_special_tokens
        chat_template=CHATML_TEMPLATE,
        padding_side="left",
    )

    eos_ids = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id]  # a turn ends at <|im_end|>
    config = Qwen2Config(
        vocab_size=len(tokenizer),  # a small corpus can yield fewer merges than cfg.vocab_size asks for
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,  # as the small Qwen2.5 models do
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids,
    )
    # Fork the RNG so that seeding the weights leaves the caller's random state alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def load_tokenizer(name_or_path: str, revision: str | None = None) -> Any:
    """A tokenizer set up for batched generation: left padding and a pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except OSError as err:
        raise _not_found(name_or_path) from err
    # Decoder-only models continue from the last position, so padding must go on the left.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str, *, dtype: str = "auto", device: str = "auto", revision: str | None = None
) -> Any:
    """A causal LM from the hub or a local directory, in eval mode on `device` (auto: cuda if available)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, revision=revision, dtype=torch_dtype(dtype), device_map=resolve_device(device)
        )
    except OSError as err:
        raise _not_found(name_or_path) from err
    return model.eval()


def torch_dtype(dtype: str) -> Any:
    """A `ModelConfig.dtype` as `from_pretrained` takes it: "auto" or a torch dtype."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return dtype if dtype == "auto" else getattr(torch, dtype)


def resolve_device(device: str) -> str:
    """`auto` -> cuda when a GPU is visible, else cpu; anything else is passed through."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def chat_messages(problem: str, *, instruction: str, system_prompt: str | None = None) -> list[dict]:
    """The zero-shot conversation for `problem`: an optional system turn, then the user turn.

    The one definition of the question as the student sees it: prompts for generation and
    the prompts of SFT and GRPO training data are all built from it.
    """
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": f"{problem}\n\n{instruction}" if instruction else problem})
    return messages


def format_prompt(tokenizer: Any, problem: str, *, instruction: str, system_prompt: str | None = None) -> str:
    """The zero-shot prompt text for `problem`, ending where the model's answer begins."""
    messages = chat_messages(problem, instruction=instruction, system_prompt=system_prompt)
    if tokenizer.chat_template is None:
        # Base models without a chat template get a plain completion-style prompt.
        prefix = f"{system_prompt}\n\n" if system_prompt else ""
        return f"{prefix}Question: {messages[-1]['content']}\nAnswer:"
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _not_found(name_or_path: str) -> OSError:
    return OSError(
        f"could not load model {name_or_path!r} from the Hugging Face hub or a local directory "
        "(wrong id or revision, no network, a gated model without a token?); "
        "model=tiny builds a small model locally and needs no hub"
    )
