"""Skillworld: arithmetic problems generated with known skills, small enough for a CPU student.

A problem starts from a number and chains 1..`max_skills_per_problem` operations, each one
skill: "Start at 37. Add 45. Mod 7." Its solution has one line per step, each ending in that
step's result, then the boxed answer:

    37+45=82
    82 mod 7=5
    \\boxed{5}

The text is terse on purpose: the student reads it one character a token, and pre-training
time grows with its length.
Because every step's result is on its own line, a response's first wrong step (and so the
skill it failed to apply) can be found exactly. Everything is pure Python and seeded.
"""

import hashlib
import random
import re
from dataclasses import dataclass

from stat_exp.config import WorldConfig
from stat_exp.grading import extract_boxed, strict_match

SUBJECT = "arithmetic"
SKILLS = ("add", "subtract", "multiply", "modulo", "compare", "digit_sum")
SMALL_FACTORS = (2, 9)  # multiply and modulo use a single digit in this range, so results stay short

# One sentence per skill in a problem's text; its groups are the operation's own numbers.
_SENTENCES = {
    "add": ("Add {0}.", re.compile(r"Add (\d+)\.")),
    "subtract": ("Subtract {0}.", re.compile(r"Subtract (\d+)\.")),
    "multiply": ("Times {0}.", re.compile(r"Times (\d+)\.")),
    "modulo": ("Mod {0}.", re.compile(r"Mod (\d+)\.")),
    "compare": ("{0} with {1}.", re.compile(r"(Max|Min) with (\d+)\.")),
    "digit_sum": ("Digit sum.", re.compile(r"Digit sum\.")),
}
_START = re.compile(r"Start at (\d+)\.")
_INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Step:
    """One operation of a solved problem."""

    skill: str
    op: str  # "+", "-", "*", "mod", "max", "min" or "digitsum"
    args: tuple[int, ...]  # the running value, then the operation's own number (none for digitsum)
    result: int

    @property
    def expression(self) -> str:
        if self.op in ("max", "min", "digitsum"):
            return f"{self.op}({','.join(map(str, self.args))})"
        return f"{self.args[0]} mod {self.args[1]}" if self.op == "mod" else f"{self.args[0]}{self.op}{self.args[1]}"

    @property
    def line(self) -> str:
        """The step as a solution writes it: the expression and its result."""
        return f"{self.expression}={self.result}"


def digit_sum(value: int) -> int:
    return sum(int(digit) for digit in str(abs(value)))


def _step(skill: str, value: int, numbers: tuple[str, ...]) -> Step:
    """The step that applies one sentence's operation (its regex groups `numbers`) to `value`."""
    if skill == "digit_sum":
        return Step(skill, "digitsum", (value,), digit_sum(value))
    if skill == "compare":
        op, other = numbers[0].lower(), int(numbers[1])
        return Step(skill, op, (value, other), max(value, other) if op == "max" else min(value, other))
    arg = int(numbers[0])
    if skill == "add":
        return Step(skill, "+", (value, arg), value + arg)
    if skill == "subtract":
        return Step(skill, "-", (value, arg), value - arg)
    if skill == "multiply":
        return Step(skill, "*", (value, arg), value * arg)
    if arg == 0:
        raise ValueError("not a skillworld problem: mod 0")
    return Step(skill, "mod", (value, arg), value % arg)


def solve(problem: str) -> list[Step]:
    """The exact steps of a skillworld problem's text; ValueError for any other text."""
    sentences = re.split(r"(?<=\.)\s+", problem.strip())
    start = _START.fullmatch(sentences[0])
    if start is None or len(sentences) < 2:
        raise ValueError(f"not a skillworld problem: {problem[:80]!r}")
    value = int(start.group(1))
    steps = []
    for sentence in sentences[1:]:
        for skill, (_, pattern) in _SENTENCES.items():
            match = pattern.fullmatch(sentence)
            if match:
                break
        else:
            raise ValueError(f"not a skillworld problem: unknown operation {sentence[:80]!r}")
        step = _step(skill, value, match.groups())
        steps.append(step)
        value = step.result
    return steps


def skills_of(steps: list[Step]) -> list[str]:
    """The distinct skills of `steps`, in the order they are first used."""
    return list(dict.fromkeys(step.skill for step in steps))


def format_solution(steps: list[Step]) -> str:
    lines = [step.line for step in steps]
    return "\n".join(lines + [f"\\boxed{{{steps[-1].result}}}"])


def step_results(response: str) -> list[int]:
    """The result named by each step line of a response: the last integer of every line that
    has one, except the final-answer line (the one with \\boxed)."""
    results = []
    for line in response.splitlines():
        numbers = _INTEGER.findall(line)
        if numbers and "\\boxed" not in line:
            results.append(int(numbers[-1]))
    return results


def first_wrong_step(problem: str, response: str) -> int | None:
    """The index of the first step whose result is wrong or missing in `response`; None when
    every step and the final answer are right. A wrong final answer after right steps blames
    the last step, whose result the answer is."""
    steps = solve(problem)
    results = step_results(response)
    for index, step in enumerate(steps):
        if index >= len(results) or results[index] != step.result:
            return index
    if not strict_match(str(steps[-1].result), extract_boxed(response)):
        return len(steps) - 1
    return None


def _weights(cfg: WorldConfig, weights: dict[str, float] | None) -> list[float]:
    unknown = sorted(set(cfg.skills) - set(SKILLS)) + sorted(set(weights or {}) - set(cfg.skills))
    if unknown:
        raise ValueError(f"unknown skills {unknown}; skillworld has {list(SKILLS)} (this world: {cfg.skills})")
    chosen = [(weights or {}).get(skill, 1.0) for skill in cfg.skills]
    if min(chosen) < 0 or sum(chosen) <= 0:
        raise ValueError(f"skill weights must be >= 0 and not all 0, got {weights}")
    return chosen


def sample_problem(
    cfg: WorldConfig, rng: random.Random, weights: dict[str, float] | None = None, require: str | None = None,
    lengths: tuple[int, int] | None = None,
) -> str:
    """A random problem's text. Each step's skill is drawn by `weights` (skills not named
    weigh 1); `require` puts that skill at one random step; `lengths` bounds its number of steps
    (default 1 to `cfg.max_skills_per_problem`). A problem whose running value would
    exceed `cfg.max_value` is redrawn: with small numbers every skill is a table the student can
    learn, so what it lacks is practice, not capacity."""
    shortest, longest = lengths or (1, cfg.max_skills_per_problem)
    skill_weights = _weights(cfg, weights)
    if require is not None and require not in cfg.skills:
        raise ValueError(f"unknown skill {require!r}; this world has {cfg.skills}")
    if cfg.max_value < cfg.max_operand:
        raise ValueError(f"max_value ({cfg.max_value}) must be at least max_operand ({cfg.max_operand})")
    while True:
        steps = rng.randint(shortest, longest)
        skills = rng.choices(cfg.skills, weights=skill_weights, k=steps)
        if require is not None:
            skills[rng.randrange(steps)] = require
        problem = _draw_numbers(cfg, rng, skills)
        if problem is not None:
            return problem


def _draw_numbers(cfg: WorldConfig, rng: random.Random, skills: list[str]) -> str | None:
    """The problem text for `skills` with random numbers; None if a value exceeds `cfg.max_value`."""
    value = rng.randint(1, cfg.max_operand)
    sentences = [f"Start at {value}."]
    for skill in skills:
        template, pattern = _SENTENCES[skill]
        if skill == "add":
            numbers: tuple = (rng.randint(1, cfg.max_operand),)
        elif skill == "subtract":  # never below 0: negative numbers would only lengthen the text
            numbers = (rng.randint(min(1, value), min(value, cfg.max_operand)),)
        elif skill in ("multiply", "modulo"):
            numbers = (rng.randint(*SMALL_FACTORS),)
        elif skill == "compare":
            numbers = (rng.choice(("Max", "Min")), rng.randint(0, cfg.max_operand))
        else:
            numbers = ()
        sentence = template.format(*numbers)
        sentences.append(sentence)
        value = _step(skill, value, pattern.fullmatch(sentence).groups()).result
        if value > cfg.max_value:
            return None
    return " ".join(sentences)


def make_row(problem: str, row_id: str) -> dict:
    """A row of the project's schema for a skillworld problem."""
    steps = solve(problem)
    return {
        "id": row_id,
        "problem": problem,
        "solution": format_solution(steps),
        "answer": str(steps[-1].result),
        "subject": SUBJECT,
        "level": len(steps),
        "skills": skills_of(steps),
    }


def generate(cfg: WorldConfig, n: int, seed: int, weights: dict[str, float] | None = None) -> list[dict]:
    """`n` rows drawn with `seed`; `weights` biases each step's skill (skills not named weigh 1)."""
    return _generate(cfg, n, seed, weights, prefix=f"skillworld-{seed}", avoid=None)


def _generate(
    cfg: WorldConfig, n: int, seed: int, weights: dict[str, float] | None, *, prefix: str, avoid: set[str] | None,
    lengths: tuple[int, int] | None = None,
) -> list[dict]:
    """Rows as `generate` makes them (with `lengths` steps, see `sample_problem`); with `avoid`, a
    problem whose text is in it is redrawn, and each kept text is added to it, so that the rows are
    distinct and new to `avoid`."""
    rng = random.Random(seed)
    rows: list[dict] = []
    draws = 0
    while len(rows) < n:
        draws += 1
        if draws > 100 * n + 1000:
            raise ValueError(f"could not draw {n} distinct new problems: max_operand={cfg.max_operand} "
                             f"and max_skills_per_problem={cfg.max_skills_per_problem} allow too few")
        problem = sample_problem(cfg, rng, weights, lengths=lengths)
        if avoid is not None:
            if problem in avoid:
                continue
            avoid.add(problem)
        rows.append(make_row(problem, f"{prefix}-{len(rows)}"))
    return rows


def rare_mixture(cfg: WorldConfig, weight: float) -> dict[str, float]:
    """Skill weights with the rare skills at `weight` (every other skill weighs 1)."""
    return {skill: weight for skill in cfg.rare_skills}


def split_seed(cfg: WorldConfig, name: str) -> int:
    """A seed of its own for each split, derived from the world's seed."""
    return int(hashlib.sha256(f"skillworld:{cfg.seed}:{name}".encode()).hexdigest()[:8], 16)


def splits(cfg: WorldConfig) -> dict[str, list[dict]]:
    """pretrain (the rare skills at `rare_weight`), train (the pool STAT selects from, the rare
    skills at `train_rare_weight`), val and test (uniform over skills, distinct problems that
    appear in neither pretrain nor train), and ood_val and ood_test: out of distribution, as the
    paper's OOD benchmarks are harder than MATH, with chains of `ood_min_skills` to
    `ood_max_skills` steps, longer than any problem the student trains or is probed on."""
    if not cfg.max_skills_per_problem < cfg.ood_min_skills <= cfg.ood_max_skills:
        raise ValueError(f"OOD chains must be longer than the pool's: need max_skills_per_problem "
                         f"({cfg.max_skills_per_problem}) < ood_min_skills ({cfg.ood_min_skills}) <= "
                         f"ood_max_skills ({cfg.ood_max_skills})")
    pretrain = _generate(cfg, cfg.pretrain_size, split_seed(cfg, "pretrain"), rare_mixture(cfg, cfg.rare_weight),
                         prefix="skillworld-pretrain", avoid=None)
    train = _generate(cfg, cfg.train_size, split_seed(cfg, "train"), rare_mixture(cfg, cfg.train_rare_weight),
                      prefix="skillworld-train", avoid=None)
    # Seen by training: 1-step problems have few variants (100 digit sums), so repeats are likely.
    seen = {row["problem"] for row in pretrain + train}
    val = _generate(cfg, cfg.val_size, split_seed(cfg, "val"), None, prefix="skillworld-val", avoid=seen)
    test = _generate(cfg, cfg.test_size, split_seed(cfg, "test"), None, prefix="skillworld-test", avoid=seen)
    # `seen` now holds val and test too, so ood_val and ood_test share no problem with any split.
    ood = (cfg.ood_min_skills, cfg.ood_max_skills)
    ood_val = _generate(cfg, cfg.ood_val_size, split_seed(cfg, "ood_val"), None, prefix="skillworld-ood_val",
                        avoid=seen, lengths=ood)
    ood_test = _generate(cfg, cfg.ood_test_size, split_seed(cfg, "ood_test"), None, prefix="skillworld-ood_test",
                         avoid=seen, lengths=ood)
    return {"pretrain": pretrain, "train": train, "val": val, "test": test, "ood_val": ood_val, "ood_test": ood_test}
