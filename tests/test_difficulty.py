from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, compose_config

from stat_exp.config import DifficultyConfig
from stat_exp.difficulty import (
    CLASSIFIERS,
    agreement,
    classify,
    classify_prm,
    prm_conversation,
    prm_rule,
    prm_scores,
    prm_verdicts,
    split_steps,
)
from stat_exp.student.models import load_tokenizer

PROBLEM = "What is 2+2?"


def record(
    predictions: list[str | None],
    correct: list[bool] | None = None,
    responses: list[str] | None = None,
) -> dict:
    """A probe record as the probe stage writes it; fields a test does not use get harmless values."""
    return {
        "id": "q",
        "problem": PROBLEM,
        "subject": "Algebra",
        "level": 1,
        "skills": [],
        "answer": "4",
        "responses": responses if responses is not None else ["..."] * len(predictions),
        "predictions": predictions,
        "correct": correct if correct is not None else [False] * len(predictions),
        "strict": [False] * len(predictions),
    }


# --- outcome, consistency, length ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("correct", "difficult", "response"),
    [
        ([False], True, 0),
        ([True], False, 0),
        ([True, True, False, False], False, 2),  # half right is not "fewer than half"
        ([True, False, False], True, 1),
        ([True, True, True], False, 0),
    ],
)
def test_outcome(correct, difficult, response):
    [verdict] = classify([record(["4"] * len(correct), correct)], DifficultyConfig(name="outcome"))
    assert verdict == {"difficult": difficult, "response": response}


@pytest.mark.parametrize(
    ("predictions", "difficult", "majority_count", "response"),
    [
        (["3", "3", "4", "5"], False, 2, 2),
        (["3", "4", "5", None], True, 1, 1),
        ([None, None, None, None], True, 0, 0),  # no answer never agrees with another
        (["7", None, "7", "7"], False, 3, 1),
        (["", "", "1", "2"], True, 1, 0),  # empty boxes are no answer either
        (["\\dfrac{1}{2}", "\\frac{1}{2}", "0.5", "2"], False, 2, 2),  # notation is normalised
        (["$27$.", "27.0", "27", "28"], False, 3, 3),
    ],
)
def test_consistency(predictions, difficult, majority_count, response):
    [verdict] = classify([record(predictions)], DifficultyConfig(name="consistency", min_agreement=2))
    assert verdict == {"difficult": difficult, "response": response, "majority_count": majority_count}


def test_consistency_threshold_follows_min_agreement():
    cfg = DifficultyConfig(name="consistency", min_agreement=3)
    verdicts = classify([record(["3", "3", "4", "5"]), record(["3", "3", "3", "5"])], cfg)
    assert [v["difficult"] for v in verdicts] == [True, False]


def test_consistency_with_exactly_min_agreement_samples():
    [verdict] = classify([record(["4", "4"])], DifficultyConfig(name="consistency", min_agreement=2))
    assert verdict == {"difficult": False, "response": 0, "majority_count": 2}


def test_consistency_needs_enough_samples():
    with pytest.raises(ValueError, match=r"difficulty\.samples >= .*\(2\).* 1 sample"):
        classify([record(["3", "3"]), record(["3"])], DifficultyConfig(name="consistency", min_agreement=2))


def test_length():
    records = [record(["1"], responses=["word " * 799]), record(["1"], responses=["word\n" * 800])]
    verdicts = classify(records, DifficultyConfig(name="length"))
    assert verdicts == [
        {"difficult": False, "response": 0, "words": 799},
        {"difficult": True, "response": 0, "words": 800},
    ]


def test_length_rounds_the_mean_to_two_places():
    [verdict] = classify([record(["1"] * 3, responses=["a", "a", "a b"])], DifficultyConfig(name="length"))
    assert verdict["words"] == 1.33


@pytest.mark.parametrize(
    ("lengths", "difficult", "words", "response"),
    [
        ([1000, 600, 800, 800, 800], True, 800, 0),  # (1000 + 600 + 3 x 800) / 5 = 800: at the threshold
        ([1000, 600, 800, 800, 799], False, 799.8, 0),  # one word short on average, though two answers reach 800
        ([100, 100, 3500, 100, 200], True, 800, 2),  # one very long answer carries the mean; it is diagnosed
        ([799, 799, 799, 799, 799], False, 799, 0),
        ([800, 800, 801, 800, 800], True, 800.2, 2),
        ([1, 2, 2, 1, 1], False, 1.4, 1),
    ],
)
def test_length_averages_over_samples(lengths, difficult, words, response):
    [verdict] = classify([record(["1"] * 5, responses=["w " * n for n in lengths])], DifficultyConfig(name="length"))
    assert verdict == {"difficult": difficult, "response": response, "words": words}


def test_consistency_over_five_samples():
    """Appendix E.1: 5 samples; difficult when the most common answer appears fewer than 2 times."""
    cfg = DifficultyConfig(name="consistency", samples=5)
    verdicts = classify([record(["1", "2", "3", "4", "5"]), record(["1", "2", "3", "4", "1"]),
                         record([None, None, "3", "4", "5"])], cfg)
    assert [(v["difficult"], v["majority_count"], v["response"]) for v in verdicts] == [
        (True, 1, 1), (False, 2, 1), (True, 1, 0)]


def test_unknown_classifier():
    with pytest.raises(ValueError, match=r"'vibes'.*prm, outcome, consistency, length"):
        classify([record(["4"])], DifficultyConfig(name="vibes"))


# --- prm ----------------------------------------------------------------------------------------

# What the fake PRM thinks of a step, by how the step's text ends.
STEP_SCORES = {
    "step is fine.": 0.99,
    "step is shaky.": 0.75,
    "step is wrong.": 0.6,
    "\\boxed{1}.": 0.99,
    "\\boxed{2}.": 0.8,
}
ASSISTANT_HEADER = "<|im_start|>assistant\n"


class FakePRM(torch.nn.Module):
    """A causal LM whose P('+') is known: at a position that ends an assistant turn's header it is
    the score `STEP_SCORES` gives the preceding user turn; everywhere else it is 0.01, so a score
    read from a wrong position shows."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.plus = tokenizer.convert_tokens_to_ids("+")
        self.minus = tokenizer.convert_tokens_to_ids("-")
        self.batches: list[int] = []
        self.widths: list[int] = []  # of each batch, padding included
        self.texts: list[str] = []  # each response as the model read it

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        self.batches.append(len(input_ids))
        self.widths.append(input_ids.shape[1])
        self.texts += [self.tokenizer.decode(ids[: int(mask.sum())]) for ids, mask in zip(input_ids, attention_mask)]
        p_plus = torch.full(input_ids.shape, 0.01)
        for row, ids in enumerate(input_ids):
            for pos in range(int(attention_mask[row].sum())):
                text = self.tokenizer.decode(ids[: pos + 1])
                if text.endswith(ASSISTANT_HEADER):
                    turn = text.rsplit("<|im_start|>user\n", 1)[1].removesuffix("<|im_end|>\n" + ASSISTANT_HEADER)
                    p_plus[row, pos] = next(p for end, p in STEP_SCORES.items() if turn.endswith(end))
        logits = torch.full((*input_ids.shape, len(self.tokenizer)), -1e4)
        logits[..., self.plus] = p_plus.log()
        logits[..., self.minus] = (1 - p_plus).log()
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def prm(tiny_model_dir: Path) -> tuple[FakePRM, object]:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    return FakePRM(tokenizer), tokenizer


def steps_response(*steps: str) -> str:
    return "\n\n".join(steps)


FINE, SHAKY, WRONG = "This step is fine.", "This step is shaky.", "This step is wrong."
# (steps, prediction, expected step scores, difficult); one response each.
CASES = {
    "clean": ([FINE, FINE], "1", [0.99, 0.99, 0.99], False),
    "last_low": ([FINE, FINE], "2", [0.99, 0.99, 0.8], True),  # mean 0.93, earlier steps high
    "mean_low": ([SHAKY, SHAKY], "1", [0.75, 0.75, 0.99], True),  # mean 0.83; last high, none <= 0.7
    "earlier_low": ([FINE, WRONG, FINE, FINE], "1", [0.99, 0.6, 0.99, 0.99, 0.99], True),  # mean 0.91
}


def case_record(*names: str) -> dict:
    return record(
        predictions=[CASES[n][1] for n in names],
        responses=[steps_response(*CASES[n][0]) for n in names],
    )


def test_split_steps():
    assert split_steps("  Add.\n\n\n\nSo 4.\n\n", "4", "\n\n") == ["Add.", "So 4.", "The final answer is \\boxed{4}."]
    assert split_steps("Add.\nSo 4.", None, "\n\n") == ["Add.\nSo 4."]
    assert split_steps("Add.\nSo 4.", None, r"\n+") == ["Add.", "So 4."]
    assert split_steps("", None, "\n\n") == []


def test_prm_conversation():
    assert prm_conversation(PROBLEM, ["A.", "B."]) == [
        {"role": "user", "content": "What is 2+2? A."},
        {"role": "assistant", "content": "+"},
        {"role": "user", "content": "B."},
        {"role": "assistant", "content": "+"},
    ]


def test_prm_scores_read_each_steps_plus_position(prm):
    model, tokenizer = prm
    model.batches.clear(), model.widths.clear(), model.texts.clear()
    records = [case_record("earlier_low", "clean"), case_record("mean_low")]
    # No answer: nothing is appended, so the last step is the response's own.
    records.append(record(predictions=[None], responses=[steps_response(FINE, SHAKY)]))
    scores = prm_scores(records, DifficultyConfig(name="prm", prm_batch_size=2), model=model, tokenizer=tokenizer)

    expected = [[CASES["earlier_low"][2], CASES["clean"][2]], [CASES["mean_low"][2]], [[0.99, 0.75]]]
    assert [[len(s) for s in r] for r in scores] == [[len(s) for s in r] for r in expected]
    for got, want in zip(scores, expected):
        for sample_got, sample_want in zip(got, want):
            assert sample_got == pytest.approx(sample_want, abs=1e-4)
    # One forward pass per response, in padded batches of at most prm_batch_size, longest first.
    assert model.batches == [2, 2]
    assert model.widths[0] > model.widths[1]
    # The problem opens each conversation.
    assert len(model.texts) == 4 and all(f"{PROBLEM} This step is" in text for text in model.texts)


class WithSpecialTokens:
    """The tests' tokenizer made to add a BOS token unless told not to, as Llama 3.1's does;
    `split` lists texts it encodes as two tokens."""

    def __init__(self, tokenizer, split: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.split = tokenizer, split
        self.bos = tokenizer.convert_tokens_to_ids("<|im_start|>")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        ids = ids + ids if text in self.split else ids
        return [self.bos, *ids] if add_special_tokens else ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


def test_prm_scores_add_no_special_tokens(prm):
    model, tokenizer = prm
    records = [case_record("earlier_low", "clean")]
    scores = prm_scores(records, DifficultyConfig(name="prm"), model=model, tokenizer=WithSpecialTokens(tokenizer))
    assert scores[0][0] == pytest.approx(CASES["earlier_low"][2], abs=1e-4)
    assert scores[0][1] == pytest.approx(CASES["clean"][2], abs=1e-4)


def test_prm_scores_need_plus_and_minus_to_be_one_token_each(prm):
    model, tokenizer = prm
    with pytest.raises(ValueError, match=r"^the PRM's tokenizer encodes '\+' as 2 tokens, not one$"):
        prm_scores([case_record("clean")], DifficultyConfig(name="prm"), model=model,
                   tokenizer=WithSpecialTokens(tokenizer, split=("+",)))


@pytest.mark.parametrize("render", [
    lambda turn: f"{turn['role']}: {turn['content']}\n",  # no assistant header
    lambda turn: f"{turn['content']}\n" if turn["role"] == "user" else "",  # no assistant turn at all
])
def test_prm_scores_fail_on_a_chat_template_without_the_assistant_turns_plus(prm, render):
    model, tokenizer = prm
    plain = WithSpecialTokens(tokenizer)
    plain.apply_chat_template = lambda conversation, tokenize, add_generation_prompt=False: "".join(
        map(render, conversation))
    one_step = record(predictions=["1"], responses=[""])  # the final answer is the only step
    with pytest.raises(ValueError, match=r"^cannot find assistant turn 0's '\+' token in the PRM's chat template$"):
        prm_scores([one_step], DifficultyConfig(name="prm"), model=model, tokenizer=plain)


def test_prm_scores_need_a_prediction_for_each_response(prm):
    model, tokenizer = prm
    mismatched = record(predictions=["1"], responses=[steps_response(FINE), steps_response(FINE)])
    with pytest.raises(ValueError, match="zip"):
        prm_scores([mismatched], DifficultyConfig(name="prm"), model=model, tokenizer=tokenizer)


def test_prm_scores_load_the_configured_prm_by_default(prm, monkeypatch):
    from stat_exp.student import models

    model, tokenizer = prm
    loaded = []
    monkeypatch.setattr(models, "load_tokenizer", lambda name: loaded.append(("tokenizer", name)) or tokenizer)
    monkeypatch.setattr(models, "load_model", lambda name: loaded.append(("model", name)) or model)
    scores = prm_scores([case_record("clean")], DifficultyConfig(name="prm", prm_model="org/prm"))
    assert scores[0][0] == pytest.approx(CASES["clean"][2], abs=1e-4)
    assert loaded == [("tokenizer", "org/prm"), ("model", "org/prm")]


@pytest.mark.parametrize("name", list(CASES))
def test_classify_prm_rule_branches(prm, name):
    model, tokenizer = prm
    steps, _, expected, difficult = CASES[name]
    [verdict] = classify_prm([case_record(name)], DifficultyConfig(name="prm"), model=model, tokenizer=tokenizer)
    assert verdict["difficult"] is difficult
    assert verdict["step_scores"] == pytest.approx(expected, abs=1e-4)
    assert len(verdict["step_scores"]) == len(steps) + 1  # the final-answer step was scored too
    assert verdict["min_score"] == pytest.approx(min(expected), abs=1e-4)
    assert verdict["response"] == 0


def test_classify_prm_majority_of_samples(prm):
    model, tokenizer = prm
    records = [
        case_record("clean", "last_low", "earlier_low"),  # 2 of 3 difficult
        case_record("clean", "last_low", "clean"),  # 1 of 3
        case_record("mean_low", "clean"),  # 1 of 2 is not a majority
    ]
    verdicts = classify_prm(records, DifficultyConfig(name="prm", prm_batch_size=4), model=model, tokenizer=tokenizer)
    assert [v["difficult"] for v in verdicts] == [True, False, False]
    assert [v["difficult_samples"] for v in verdicts] == [2, 1, 1]
    # The sample to diagnose is the one with the lowest step score.
    assert [v["response"] for v in verdicts] == [2, 1, 0]
    assert verdicts[0]["min_score"] == pytest.approx(0.6, abs=1e-4)


def test_prm_scores_with_a_real_model_do_not_depend_on_batching(tiny_model_dir: Path):
    from stat_exp.student.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir), device="cpu"), load_tokenizer(str(tiny_model_dir))
    records = [case_record("earlier_low", "clean"), case_record("mean_low")]
    one_by_one = prm_scores(records, DifficultyConfig(name="prm", prm_batch_size=1), model=model, tokenizer=tokenizer)
    padded = prm_scores(records, DifficultyConfig(name="prm", prm_batch_size=3), model=model, tokenizer=tokenizer)
    assert [[len(s) for s in r] for r in one_by_one] == [[5, 3], [3]]
    assert all(0 < score < 1 for r in one_by_one for s in r for score in s)
    for got, want in zip(padded, one_by_one):
        for sample_got, sample_want in zip(got, want):
            assert sample_got == pytest.approx(sample_want, abs=1e-5)


@pytest.mark.parametrize(
    ("scores", "difficult"),
    [
        ([0.9, 0.9, 0.86], False),
        ([0.9, 0.9, 0.85], True),  # last <= tau1, boundary included
        ([0.72, 0.8, 0.99], True),  # mean 0.837 <= tau1
        ([0.99, 0.7, 0.99, 0.99], True),  # an earlier step <= tau2, boundary included
        ([0.99, 0.71, 0.99, 0.99, 0.99], False),
        ([0.5], True),
        ([], True),
        ([0.99, 0.7, 0.99], True),  # the step before the last is an earlier step
        ([0.75, 0.95], True),  # mean exactly tau1 (0.85); last and earlier steps above their thresholds
    ],
)
def test_prm_rule(scores, difficult):
    assert prm_rule(scores, tau1=0.85, tau2=0.7) is difficult


def test_prm_verdicts_round_scores_to_four_places():
    [verdict] = prm_verdicts([[[0.123456, 0.99]]], DifficultyConfig(name="prm"))
    assert verdict["step_scores"] == [0.1235, 0.99] and verdict["min_score"] == 0.1235


def test_prm_verdicts_with_an_unscorable_sample():
    [verdict] = prm_verdicts([[[0.99, 0.99], []]], DifficultyConfig(name="prm"))
    assert verdict == {
        "difficult": False,
        "response": 1,
        "step_scores": [],
        "min_score": None,
        "difficult_samples": 1,
    }


# --- agreement and configs ----------------------------------------------------------------------


def verdicts_of(*flags: bool) -> list[dict]:
    return [{"difficult": f, "response": 0} for f in flags]


def test_agreement():
    result = agreement(verdicts_of(True, True, True, False, False), verdicts_of(True, False, False, True, False))
    assert result == {
        "precision": 0.3333,
        "recall": 0.5,
        "tp": 1,
        "fp": 2,
        "fn": 1,
        "difficult": 3,
        "outcome_difficult": 2,
    }


def test_agreement_zero_denominators():
    nothing_flagged = agreement(verdicts_of(False, False), verdicts_of(True, False))
    assert nothing_flagged["precision"] is None and nothing_flagged["recall"] == 0.0
    nothing_wrong = agreement(verdicts_of(True, False), verdicts_of(False, False))
    assert nothing_wrong["recall"] is None and nothing_wrong["precision"] == 0.0
    assert agreement([], [])["precision"] is None
    # As many false positives as true ones: precision one half; recall to four places.
    result = agreement(verdicts_of(True, True, False, False), verdicts_of(True, False, True, True))
    assert (result["precision"], result["recall"]) == (0.5, 0.3333)
    with pytest.raises(ValueError, match="2 verdicts but 1"):
        agreement(verdicts_of(True, False), verdicts_of(True))


def test_every_classifier_has_a_config_that_composes():
    names = sorted(p.stem for p in (ROOT / "conf" / "difficulty").glob("*.yaml"))
    assert names == sorted(CLASSIFIERS)
    for name in names:
        cfg = compose_config(f"difficulty={name}")
        assert cfg.difficulty.name == name
        if name in ("consistency", "length"):
            # Appendix E.1: 5 sampled answers, which must be able to differ.
            assert cfg.difficulty.samples == 5 and cfg.difficulty.temperature > 0
            assert cfg.difficulty.min_agreement == 2 and cfg.difficulty.min_words == 800
        else:
            assert cfg.difficulty.samples == 1 and cfg.difficulty.temperature == 0.1
