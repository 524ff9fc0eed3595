import pytest

from stat_exp.rewards import REWARDS, correctness_reward, format_reward, get_rewards


def as_messages(text: str) -> list[dict]:
    """A completion as TRL passes it for a conversational dataset."""
    return [{"role": "assistant", "content": text}]


TEXTS = [
    "We add: 1/2 + 1/4 = 3/4. The answer is \\boxed{\\frac{3}{4}}.",  # equivalent to 0.75
    "So the answer is \\boxed{0.5}.",  # boxed, wrong
    "The answer is 0.75.",  # right number, not boxed
    "First \\boxed{0.75}, then on reflection \\boxed{1}.",  # the last box counts
    "Unbalanced \\boxed{0.75",  # unreadable box
]
GOLD = ["0.75"] * len(TEXTS)


@pytest.mark.parametrize("form", [str, as_messages], ids=["string", "conversational"])
def test_correctness(form) -> None:
    assert correctness_reward([form(t) for t in TEXTS], GOLD) == [1.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("form", [str, as_messages], ids=["string", "conversational"])
def test_format(form) -> None:
    assert format_reward([form(t) for t in TEXTS], GOLD) == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_correctness_ignores_trl_extras() -> None:
    completions = [as_messages("\\boxed{7}"), as_messages("\\boxed{8}")]
    rewards = correctness_reward(
        completions, ["7", "7"], prompts=[[], []], completion_ids=[[1], [2]], trainer_state=None
    )
    assert rewards == [1.0, 0.0]


def test_correctness_off_the_main_thread() -> None:
    """math-verify's timeouts need the main thread; elsewhere grading falls back to worker processes."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        rewards = pool.submit(correctness_reward, ["\\boxed{2/4}", "\\boxed{3}"], ["1/2", "1/2"]).result()
    assert rewards == [1.0, 0.0]


def test_registry() -> None:
    assert get_rewards(["format", "correctness"]) == [format_reward, correctness_reward]
    assert set(REWARDS) == {"correctness", "format"}
    with pytest.raises(ValueError, match=r"'speed'.*correctness, format"):
        get_rewards(["correctness", "speed"])
