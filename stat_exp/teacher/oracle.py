"""The skillworld teacher: a litellm custom provider that answers our prompts exactly.

`register()` makes `model="oracle/skillworld"` reach `SkillworldOracle` through
`litellm.completion` / `litellm.acompletion`. The Teacher client (its cache, retries and
accounting unchanged) calls the registered oracle directly (`complete`): litellm's dispatch,
logging and pricing of a call took nine tenths of an oracle request's time (labelling 20,000
problems: 86 s through litellm, 9 s direct). The oracle reads the prompt kind from the request's
`metadata={"kind": ...}` when the caller passes it, else from its template's wording, pulls
the problem, response and skill lists out of the rendered prompt, and answers in the tags the
parsers read. It knows each problem's skills by solving it (`skillworld.solve`).

Answers are deterministic: a prompt (and `metadata["sample"]`, when given) seeds the random
choices, so the same request always gets the same answer.
"""

import hashlib
import os
import random
import re
from typing import Any, Callable

from stat_exp.code_fingerprint import digest, module_code
from stat_exp.config import WorldConfig
from stat_exp.grading import extract_boxed, strict_match
from stat_exp.tasks import skillworld
from stat_exp.tasks.skillworld import Step

PROVIDER = "oracle"

# A phrase only that kind's template has; diagnosis first, since only it embeds free text
# (the student's response) that might quote another template.
_KIND_MARKERS = (
    ("diagnosis", "--- BEGIN RESPONSE ---"),
    ("skill_extraction", "Label this problem with the ONE specific mathematical skill"),
    ("skill_clustering", "Group them into between"),
    ("skill_labelling", "Which skills from this list are needed to solve the problem?"),
    ("synthesis", "Write new practice problems that train"),
    ("rewrite", "Rewrite the reference solution"),
    ("solution", "Solve the following problem."),
)

# How a rewrite words each operation, always ending with the step's result.
_PHRASES = {
    "+": "Adding {1} to {0} gives {r}.",
    "-": "Taking {1} away from {0} leaves {r}.",
    "*": "{0} times {1} is {r}.",
    "mod": "The remainder of {0} divided by {1} is {r}.",
    "max": "The larger of {0} and {1} is {r}.",
    "min": "The smaller of {0} and {1} is {r}.",
    "digitsum": "The digits of {0} add up to {r}.",
}


def register(world: WorldConfig | None = None) -> None:
    """Route `oracle/...` models to a `SkillworldOracle` of `world` (default: WorldConfig());
    calling it again replaces the handler rather than adding a second one."""
    # As the client does: litellm fetches its price table from GitHub at import unless told not to.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    handler = _handler_class()(world or WorldConfig())
    others = [entry for entry in litellm.custom_provider_map if entry.get("provider") != PROVIDER]
    litellm.custom_provider_map = others + [{"provider": PROVIDER, "custom_handler": handler}]


def serves(model: str) -> bool:
    """Whether the teacher model name `model` is this oracle's (`oracle/...`)."""
    return model.startswith(f"{PROVIDER}/")


def registered() -> list:
    """The oracle handlers registered with litellm: one after `register()`, none before."""
    import litellm

    return [entry["custom_handler"] for entry in litellm.custom_provider_map if entry.get("provider") == PROVIDER]


def fingerprint() -> str:
    """The registered oracle's code and world: what its answers depend on besides the prompt."""
    worlds = [handler.world for handler in registered()]
    return hashlib.sha256(repr((digest(module_code(__name__)), worlds)).encode()).hexdigest()[:16]


def complete(model: str, messages: list, *, kind: str, sample: int) -> Any:
    """The registered oracle's answer to `messages` (a litellm ModelResponse, its usage counted with
    litellm's tokenizer as through litellm), without litellm's dispatch around it."""
    import litellm

    ensure_registered()
    (handler,) = registered()
    return handler.completion(model.removeprefix(f"{PROVIDER}/"), messages, encoding=litellm.encoding,
                              litellm_params={"metadata": {"kind": kind, "sample": sample}})


def ensure_registered() -> None:
    """Register the default world's oracle unless an oracle (of any world) is registered already."""
    if not registered():
        register()


def _handler_class() -> type:
    """The litellm handler class, defined here so that litellm is imported only when needed."""
    import litellm
    from litellm import CustomLLM

    class SkillworldOracle(CustomLLM):
        def __init__(self, world: WorldConfig):
            super().__init__()
            self.world = world

        def completion(self, model: str, messages: list, *args: Any, **kwargs: Any) -> Any:
            metadata = (kwargs.get("litellm_params") or {}).get("metadata") or {}
            prompt = _user_text(messages)
            text = answer(prompt, self.world, kind=metadata.get("kind"), sample=metadata.get("sample", 0))
            prompt_tokens = _count_tokens(kwargs.get("encoding"), prompt)
            completion_tokens = _count_tokens(kwargs.get("encoding"), text)
            return litellm.ModelResponse(
                model=f"{PROVIDER}/{model}",
                choices=[{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                usage=litellm.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                    total_tokens=prompt_tokens + completion_tokens),
            )

        async def acompletion(self, model: str, messages: list, *args: Any, **kwargs: Any) -> Any:
            return self.completion(model, messages, *args, **kwargs)  # pure computation: nothing to await

    return SkillworldOracle


def _user_text(messages: list) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    if not users or not isinstance(users[-1], str):
        raise ValueError("the oracle needs a user message with text content")
    return users[-1]


def _count_tokens(encoding: Any, text: str) -> int:
    # litellm hands custom providers its tokenizer; without one, count ~4 characters a token.
    return len(encoding.encode(text)) if encoding is not None else max(1, len(text) // 4)


def detect_kind(prompt: str) -> str:
    """The prompt kind of a rendered user message, from its template's distinctive wording."""
    for kind, marker in _KIND_MARKERS:
        if marker in prompt:
            return kind
    raise ValueError(f"not one of our teacher prompts: {prompt[:120]!r}")


def answer(prompt: str, world: WorldConfig, *, kind: str | None = None, sample: int = 0) -> str:
    """The oracle's answer to the user message `prompt` of prompt kind `kind` (None: detected)."""
    kind = kind or detect_kind(prompt)
    if kind not in _ANSWERS:
        raise ValueError(f"the oracle has no answer for prompt kind {kind!r}")
    seed = int(hashlib.sha256(f"{sample}\0{prompt}".encode()).hexdigest()[:16], 16)
    try:
        return _ANSWERS[kind](prompt, world, random.Random(seed))
    except ValueError as err:
        # An answer with no tags: the client's parser rejects it, counts it and keeps this text.
        return f"I cannot answer this {kind} prompt: {err}"


# Pieces of the rendered templates (see templates/*.j2).


def _between(text: str, start: str, end: str, *, last_end: bool = False) -> str:
    begin = text.find(start)
    if begin < 0:
        raise ValueError(f"no {start.strip()!r} section")
    begin += len(start)
    stop = text.rfind(end) if last_end else text.find(end, begin)
    if stop < begin:
        raise ValueError(f"no {end.strip()!r} after {start.strip()!r}")
    return text[begin:stop].strip()


def _bullets(text: str, heading: str) -> list[str]:
    """The `- item` lines of the list that follows the last line starting with `heading`."""
    start = text.rfind(heading)
    if start < 0:
        raise ValueError(f"no {heading!r} list")
    lines = text[start:].splitlines()[1:]
    while lines and not lines[0].strip():
        lines.pop(0)
    items = []
    for line in lines:
        if not line.startswith("- "):
            break
        items.append(line[2:].strip())
    return items


def _find(pattern: str, text: str) -> str:
    """The first group of `pattern`'s first match in `text`."""
    match = re.search(pattern, text)
    if match is None:
        raise ValueError(f"the prompt has no match for {pattern!r}")
    return match.group(1)


def _problem(prompt: str) -> str:
    """The `## Problem` section: up to the next section or the end (the templates put it last)."""
    begin = prompt.find("## Problem\n")
    if begin < 0:
        raise ValueError("no '## Problem' section")
    return prompt[begin + len("## Problem\n"):].split("\n\n## ", 1)[0].strip()


def _skill_tag(skills: list[str]) -> str:
    """The skills as the prompts ask for them, and as the paper's teacher writes them: one tag, commas."""
    return f"<skill>{', '.join(skills)}</skill>"


# One function per prompt kind: (prompt, world, rng) -> answer text.


def _extraction(prompt: str, world: WorldConfig, rng: random.Random) -> str:
    first = skillworld.solve(_problem(prompt))[0]
    return f"<skill>{first.skill}</skill>\n<reason>The first step, {first.line}, needs {first.skill}.</reason>"


def _clustering(prompt: str, world: WorldConfig, rng: random.Random) -> str:
    # The catalogue is the world's skills, not only those the sampled questions showed first: a
    # skill rare in the pool may be missing from the sample, and it is the one a profile must name.
    given = set(_bullets(prompt, "## Fine-grained skills for "))
    return "\n".join(f"<skill>{skill}</skill>\n<members>{skill if skill in given else ''}</members>"
                     for skill in world.skills)


def _labelling(prompt: str, world: WorldConfig, rng: random.Random) -> str:
    steps = skillworld.solve(_problem(prompt))
    allowed = _bullets(prompt, "## Skills for ")
    limit = int(_find(r"Choose at most (\d+)", prompt))
    known = [skill for skill in skillworld.skills_of(steps) if skill in allowed][:limit]
    uses = "; ".join(f"{step.line} uses {step.skill}" for step in steps)
    return f"{_skill_tag(known)}\n<reason>{uses}.</reason>"


def _diagnosis(prompt: str, world: WorldConfig, rng: random.Random) -> str:
    problem = _problem(prompt)
    steps = skillworld.solve(problem)
    response = _between(prompt, "--- BEGIN RESPONSE ---\n", "\n--- END RESPONSE ---", last_end=True)
    # Judged by the final answer, as the outcome classifier does; the reason still names a wrong step.
    if strict_match(str(steps[-1].result), extract_boxed(response)):
        return f"<reason>The final answer {steps[-1].result} is right.</reason>\n<judge>correct</judge>"
    results = skillworld.step_results(response)
    if not results:
        return (f"<reason>The response has no step with a result, so it applied none of the steps; it should "
                f"have computed {'; '.join(step.line for step in steps)}.</reason>\n<judge>incorrect</judge>\n"
                f"{_skill_tag(skillworld.skills_of(steps))}")
    wrong = skillworld.first_wrong_step(problem, response)  # not None: the final answer is wrong
    step = steps[wrong]
    if wrong >= len(results):
        what = "gives no result for it"
    elif results[wrong] != step.result:
        what = f"writes {results[wrong]}"
    else:
        what = "gets it right but ends with a wrong or missing final answer"
    return (f"<reason>The response first goes wrong at step {wrong + 1}: it {what}, but it should have "
            f"computed {step.line} ({step.skill}).</reason>\n<judge>incorrect</judge>\n<skill>{step.skill}</skill>")


def _synthesis(prompt: str, world: WorldConfig, rng: random.Random) -> str:
    skill = _find(r"## Skill\n`([^`]+)`", prompt)
    count = int(_find(r"Write (\d+) NEW problems", prompt))
    if skill not in world.skills:
        raise ValueError(f"{skill!r} is not a skill of this world ({', '.join(world.skills)})")
    taken = {example.strip() for example in re.findall(r"### Problem\n(.*?)(?=\n\n## Example|\Z)", prompt, re.DOTALL)}
    questions: list[str] = []
    for _ in range(100 * count):  # bounded: a tiny world may have fewer new problems than asked
        problem = skillworld.sample_problem(world, rng, require=skill)
        if problem not in taken:
            taken.add(problem)
            questions.append(problem)
        if len(questions) == count:
            break
    uses = "; ".join(next(step.line for step in skillworld.solve(q) if step.skill == skill) for q in questions)
    return (f"<reason>Each problem needs `{skill}`: {uses}.</reason>\n"
            + "\n".join(f"<question>{question}</question>" for question in questions))


def _solution(prompt: str, world: WorldConfig, rng: random.Random) -> str:
    problem = prompt.split("\n\n", 1)[1] if "\n\n" in prompt else ""
    return skillworld.format_solution(skillworld.solve(problem))


def _rewrite(prompt: str, world: WorldConfig, rng: random.Random) -> str:
    steps = skillworld.solve(_problem(prompt))
    return "\n".join([_reworded(step, index, rng) for index, step in enumerate(steps)]
                     + [f"So the final answer is \\boxed{{{steps[-1].result}}}."])


def _reworded(step: Step, index: int, rng: random.Random) -> str:
    """A step in other words, or numbered; either way one line that ends with its result."""
    if rng.random() < 0.5:
        return f"Step {index + 1}: {step.line}"
    return _PHRASES[step.op].format(*step.args, r=step.result)


_ANSWERS: dict[str, Callable[[str, WorldConfig, random.Random], str]] = {
    "skill_extraction": _extraction,
    "skill_clustering": _clustering,
    "skill_labelling": _labelling,
    "diagnosis": _diagnosis,
    "synthesis": _synthesis,
    "solution": _solution,
    "rewrite": _rewrite,
}
