import re
from collections import Counter

import pytest

from stat_exp.config import WorldConfig
from stat_exp.grading import extract_boxed
from stat_exp.tasks import skillworld
from stat_exp.tasks.skillworld import first_wrong_step, generate, solve, splits

SMALL = WorldConfig(pretrain_size=3000, train_size=600, val_size=200, test_size=200, ood_val_size=200,
                    ood_test_size=200)

# Each solution line evaluated on its own, without skillworld's code: (pattern, function).
LINE_RULES = [
    (r"(\d+)\+(\d+)=(-?\d+)", lambda a, b: a + b),
    (r"(\d+)-(\d+)=(-?\d+)", lambda a, b: a - b),
    (r"(\d+)\*(\d+)=(-?\d+)", lambda a, b: a * b),
    (r"(\d+) mod (\d+)=(-?\d+)", lambda a, b: a % b),
    (r"max\((\d+),(\d+)\)=(-?\d+)", max),
    (r"min\((\d+),(\d+)\)=(-?\d+)", min),
    (r"digitsum\((\d+)\)=(-?\d+)", lambda a: sum(map(int, str(a)))),
]


def evaluate_line(line: str) -> tuple[int, int]:
    """(the line's first number, its result), after checking that the result is right."""
    for pattern, function in LINE_RULES:
        match = re.fullmatch(pattern, line)
        if match:
            *args, result = map(int, match.groups())
            assert function(*args) == result, line
            return args[0], result
    raise AssertionError(f"unreadable step line {line!r}")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return generate(SMALL, 400, seed=1)


def test_every_step_and_answer_is_right(rows: list[dict]) -> None:
    for row in rows:
        *lines, last = row["solution"].split("\n")
        assert last == f"\\boxed{{{row['answer']}}}"
        value = int(re.match(r"Start at (\d+)\.", row["problem"]).group(1))
        for line in lines:
            first, value = evaluate_line(line)
            assert first >= 0 and value >= 0
        assert int(row["answer"]) == value == int(extract_boxed(row["solution"]))


def test_lines_chain_and_follow_the_problem(rows: list[dict]) -> None:
    words = {"Add": "+", "Subtract": "-", "Times": "*", "Mod": "mod", "Max with": "max", "Min with": "min",
             "Digit sum": "digitsum"}
    for row in rows:
        sentences = row["problem"].split(". ")[1:]
        lines = row["solution"].split("\n")[:-1]
        assert len(sentences) == len(lines) == row["level"]
        previous = int(re.match(r"Start at (\d+)\.", row["problem"]).group(1))
        for sentence, line in zip(sentences, lines):
            op = next(op for prefix, op in words.items() if sentence.startswith(prefix))
            assert op in line
            if op != "digitsum":
                assert re.search(r"(\d+)\.?$", sentence).group(1) in line
            first, result = evaluate_line(line)
            assert first == previous  # each step starts from the previous result
            previous = result


def test_solve_round_trips(rows: list[dict]) -> None:
    for row in rows:
        steps = solve(row["problem"])
        assert skillworld.format_solution(steps) == row["solution"]
        assert [step.line for step in steps] == row["solution"].split("\n")[:-1]
        assert str(steps[-1].result) == row["answer"]


def test_skills_and_level(rows: list[dict]) -> None:
    for row in rows:
        steps = solve(row["problem"])
        assert row["level"] == len(steps)
        assert row["skills"] == list(dict.fromkeys(step.skill for step in steps))
        assert row["subject"] == "arithmetic" and isinstance(row["answer"], str)
    assert {row["level"] for row in rows} == set(range(1, SMALL.max_skills_per_problem + 1))
    assert {skill for row in rows for skill in row["skills"]} == set(SMALL.skills)
    assert len({row["id"] for row in rows}) == len(rows)


def test_numbers_stay_small(rows: list[dict]) -> None:
    for row in rows:
        for step in solve(row["problem"]):
            if step.skill in ("multiply", "modulo"):
                assert 2 <= step.args[1] <= 9
            assert max(step.args) <= SMALL.max_value and 0 <= step.result <= SMALL.max_value
        assert len(row["problem"]) < 80 and len(row["solution"]) < 60
    # Without the bound, chains of products would grow past it.
    assert any(step.result > 99 for row in generate(WorldConfig(max_value=10_000), 400, seed=1)
               for step in solve(row["problem"]))
    with pytest.raises(ValueError, match="max_value"):
        generate(WorldConfig(max_value=10), 1, seed=0)


@pytest.mark.parametrize("text", [
    "What is 2+2?",
    "Start at 5.",
    "Start at 5. Fly away.",
    "Start at 5. Mod 0.",
    "Begin at 5. Add 3.",
])
def test_solve_rejects_other_text(text: str) -> None:
    with pytest.raises(ValueError):
        solve(text)


def test_generate_is_deterministic_and_checks_weights() -> None:
    assert generate(SMALL, 50, seed=3) == generate(SMALL, 50, seed=3)
    assert generate(SMALL, 50, seed=3) != generate(SMALL, 50, seed=4)
    only_add = generate(SMALL, 50, seed=3, weights={skill: 0.0 for skill in SMALL.skills if skill != "add"})
    assert all(row["skills"] == ["add"] for row in only_add)
    with pytest.raises(ValueError, match="unknown skills"):
        generate(SMALL, 5, seed=0, weights={"division": 1.0})
    with pytest.raises(ValueError, match="not all 0"):
        generate(SMALL, 5, seed=0, weights={skill: 0.0 for skill in SMALL.skills})


@pytest.fixture(scope="module")
def world_splits() -> dict[str, list[dict]]:
    return splits(SMALL)


def test_splits_sizes_disjoint_and_deterministic(world_splits: dict[str, list[dict]]) -> None:
    assert {name: len(rows) for name, rows in world_splits.items()} == {
        "pretrain": SMALL.pretrain_size, "train": SMALL.train_size, "val": SMALL.val_size, "test": SMALL.test_size,
        "ood_val": SMALL.ood_val_size, "ood_test": SMALL.ood_test_size}
    texts = {name: {row["problem"] for row in rows} for name, rows in world_splits.items()}
    seen = texts["pretrain"] | texts["train"]
    assert not seen & texts["val"] and not seen & texts["test"] and not texts["val"] & texts["test"]
    assert len(texts["val"]) == SMALL.val_size and len(texts["test"]) == SMALL.test_size  # no repeats
    ids = [row["id"] for rows in world_splits.values() for row in rows]
    assert len(set(ids)) == len(ids)
    assert splits(SMALL) == world_splits
    other = splits(WorldConfig(pretrain_size=50, train_size=50, val_size=20, test_size=20, ood_val_size=20,
                               ood_test_size=20, seed=1))
    assert other["test"] != world_splits["test"][:20] and other["ood_test"] != world_splits["ood_test"][:20]


def test_ood_splits_are_new_and_longer_than_anything_trained_or_probed(world_splits: dict[str, list[dict]]) -> None:
    texts = {name: {row["problem"] for row in rows} for name, rows in world_splits.items()}
    in_distribution = texts["pretrain"] | texts["train"] | texts["val"] | texts["test"]
    assert not in_distribution & texts["ood_val"] and not in_distribution & texts["ood_test"]
    assert not texts["ood_val"] & texts["ood_test"] and len(texts["ood_test"]) == SMALL.ood_test_size
    # Harder as the paper's OOD benchmarks are: every chain is longer than any the student saw.
    longest = max(len(solve(row["problem"])) for name in ("pretrain", "train", "val", "test")
                  for row in world_splits[name])
    assert longest == SMALL.max_skills_per_problem == 3
    for name in ("ood_val", "ood_test"):
        rows = world_splits[name]
        assert {len(solve(row["problem"])) for row in rows} == {row["level"] for row in rows} == {4}
        # Uniform over the skills (no rare ones): each near 1/6 of the steps.
        counts = Counter(step.skill for row in rows for step in solve(row["problem"]))
        assert all(0.1 < counts[skill] / sum(counts.values()) < 0.25 for skill in SMALL.skills)
    wider = splits(WorldConfig(pretrain_size=50, train_size=50, val_size=20, test_size=20, ood_val_size=100,
                               ood_test_size=20, ood_max_skills=5))
    assert {row["level"] for row in wider["ood_val"]} == {4, 5}


@pytest.mark.parametrize("lengths", [{"ood_min_skills": 3}, {"ood_min_skills": 5, "ood_max_skills": 4}])
def test_ood_chains_must_be_longer_than_the_pools(lengths: dict) -> None:
    with pytest.raises(ValueError, match=f"ood_min_skills \\({lengths['ood_min_skills']}\\)"):
        splits(WorldConfig(pretrain_size=10, train_size=10, val_size=5, test_size=5, **lengths))


def test_rare_skills_have_their_weight_in_pretrain_and_train_and_none_in_val_and_test(
    world_splits: dict[str, list[dict]],
) -> None:
    def step_shares(rows: list[dict]) -> dict[str, float]:
        counts = Counter(step.skill for row in rows for step in solve(row["problem"]))
        return {skill: counts[skill] / sum(counts.values()) for skill in SMALL.skills}

    shares = {name: step_shares(rows) for name, rows in world_splits.items()}
    common = [skill for skill in SMALL.skills if skill not in SMALL.rare_skills]
    for skill in SMALL.rare_skills:
        # Expected shares: 0.03 / (4 + 2 * 0.03) ~ 0.007 in pretrain, 0.1 / 4.2 ~ 0.024 in the pool,
        # against ~0.24 for a common skill.
        assert shares["pretrain"][skill] < 0.015 < shares["train"][skill] < 0.05
    assert 0.2 < min(shares[name][s] for name in ("pretrain", "train") for s in common)
    for name in ("val", "test"):
        assert all(0.1 < share < 0.25 for share in shares[name].values())


def test_first_wrong_step_finds_a_planted_error(rows: list[dict]) -> None:
    for row in rows:
        lines = row["solution"].split("\n")
        assert first_wrong_step(row["problem"], row["solution"]) is None
        for j in range(row["level"]):
            wrong = list(lines)
            wrong[j] = re.sub(r"\d+$", lambda m: str(int(m.group()) + 1), wrong[j])
            assert first_wrong_step(row["problem"], "\n".join(wrong)) == j
            missing = lines[:j] + lines[-1:]
            assert first_wrong_step(row["problem"], "\n".join(missing)) == j


def test_first_wrong_step_edge_cases() -> None:
    problem = "Start at 37. Add 45. Mod 7."
    right = "37+45=82\n82 mod 7=5\n\\boxed{5}"
    assert first_wrong_step(problem, right) is None
    assert first_wrong_step(problem, "Step 1: 37 plus 45 is 82\n\nThe remainder is 5\n\\boxed{5}") is None
    assert first_wrong_step(problem, right.replace("{5}", "{6}")) == 1  # right steps, wrong answer: the last step
    assert first_wrong_step(problem, right.replace("\\boxed{5}", "5")) == 1  # no final answer
    assert first_wrong_step(problem, "") == 0
    assert first_wrong_step(problem, "37+45=81\n81 mod 7=4\n\\boxed{4}") == 0
