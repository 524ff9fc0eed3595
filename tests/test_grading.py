import json
import logging
import multiprocessing
import threading
import time

import pytest

from helpers import SHARED_DATA
from stat_exp import grading
from stat_exp.grading import (
    Grade,
    extract_boxed,
    grade,
    normalize_answer,
    normalize_notation,
    strict_match,
    verify_answer,
)

# Parsed and compared quickly; math-verify's timeouts (signal.alarm, whole seconds) stop it.
ADVERSARIAL = r"10^{10^{10^{10}}}"


def math500() -> list[dict]:
    with (SHARED_DATA / "math500" / "test.jsonl").open() as file:
        return [json.loads(line) for line in file]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"$\boxed{\sqrt{\frac{a}{b^{2}}}}$", r"\sqrt{\frac{a}{b^{2}}}"),
        (r"first \boxed{1}, then \boxed{2}", "2"),
        (r"the answer is \fbox{7} minutes", "7"),
        (r"\boxed{1} and finally \fbox{x+1}", "x+1"),
        (r"$\boxed 5$ apples", "5"),
        (r"\boxed {12}", "12"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        ("no box here", None),
        (r"\boxed{\frac{1}{2}", None),
        (r"\boxed{3} then \boxed{4", None),
        (r"\boxedx{3}", None),
        (r"$\boxed $ and nothing in it", None),
        (r"the answer goes in a \boxed.", None),
        (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),  # an escaped brace opens nothing
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("gold", "pred"),
    [
        (r"\frac{1}{2}", r"\dfrac{1}{2}"),
        (r"\frac{1}{2}", r"\tfrac{1}{2}"),
        ("27", "27.0"),
        ("27", "$27$."),
        ("90", r"90^\circ"),
        ("90", r"90^{\circ}"),
        (r"10\text{ cm}", "10"),
        (r"\text{Evelyn}", "Evelyn"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
        (r"3\,000", "3000"),
        (r"x\!+\!1", "x + 1"),
    ],
)
def test_strict_match_ignores_notation(gold, pred):
    assert strict_match(gold, pred)


@pytest.mark.parametrize(
    ("gold", "pred"),
    [
        (r"\frac{1}{2}", "0.5"),  # equal values, different strings: strict says no
        ("27", "27.5"),
        ("27", "270"),
        ("2", "x=2"),
        ("XIX", "XI"),  # only a final full stop is notation
        ("5", None),
        ("", ""),
    ],
)
def test_strict_match_is_strict(gold, pred):
    assert not strict_match(gold, pred)


# The notation the standard MATH harnesses ignore, each case from their code: Hendrycks et al.'s
# `is_equiv` (modeling/math_equivalence.py, `_strip_string`), Qwen2.5-Math's `strip_string` and
# `choice_answer_clean` (evaluation/parser.py, grader.py) and lm-eval's minerva_math
# `normalize_final_answer` (lm_eval/tasks/minerva_math/utils.py). Both metrics accept them.
HARNESS_EQUIVALENT = [
    (r"25\%", "25"),  # Hendrycks, Qwen: "remove percentage" (`\%` and `%`)
    ("25", "25%"),
    (r"10\text{ cm}", "10"),  # Hendrycks `_remove_right_units`: `\text{ ` only ever describes units
    (r"5\text{ inches}", r"5\mbox{ inches}"),  # Qwen: a trailing `\text{...}` unit; minerva: mbox is text
    (r"12\text{ cm}^2", "12"),  # minerva: `\text{}^2` removed
    (r"10{,}000", "10000"),  # minerva: "{,}" removed
    ("100,000", "100000"),  # minerva: "Normalize 100,000 -> 100000"
    (r"30^\circ", "30"),  # Hendrycks, Qwen, minerva: "Remove circ (degrees)"
    (r"30^{\circ}", "30"),
    (r"\$18.90", "18.90"),  # Hendrycks, Qwen, minerva: "remove dollar signs"
    (r"3\!000", "3000"),  # Hendrycks, Qwen: "remove inverse spaces"
    (r"\dfrac{3}{4}", r"\frac{3}{4}"),  # Hendrycks, Qwen: "replace tfrac and dfrac with frac"
    (r"\tfrac{3}{4}", r"\frac34"),  # and Hendrycks' `_fix_fracs`: \frac34 is \frac{3}{4}
    (r"\text{(B)}", "B"),  # Qwen `choice_answer_clean`: the letter of a multiple-choice answer
    (r"\text{(B)}", "(B)"),
    (r"\textbf{(C)}", "C"),
    ("(E)", r"\text{E}"),
]


@pytest.mark.parametrize(("gold", "pred"), HARNESS_EQUIVALENT)
def test_harness_notation_is_right_by_both_metrics(gold, pred):
    assert strict_match(gold, pred) and strict_match(pred, gold)
    assert verify_answer(gold, pred) and verify_answer(pred, gold)


@pytest.mark.parametrize(
    ("gold", "pred"),
    [
        (r"25\%", "0.25"),  # Qwen's `include_percentage` accepts it; we do not (see the README)
        ("1,2", "12"),  # a list, not a thousands separator (minerva would join it)
        ("10,00", "1000"),  # not groups of three digits
        (r"\text{(B)}", "C"),
        (r"(B)", r"\text{(D)}"),
        (r"10\text{ cm}", "100"),
        (r"x\text{-axis}", "x"),  # not a unit: the text stays
    ],
)
def test_harness_notation_keeps_what_differs(gold, pred):
    assert not strict_match(gold, pred)


@pytest.mark.parametrize(
    ("answer", "normalized"),
    [
        (r"\$1{,}000.50", "1000.50"),
        (r"45\%", "45"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"\left( 3, \frac{\pi}{2} \right)"),  # math is left alone
        (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),  # `\\` is a row break
        (r"\text{Evelyn}", r"\text{Evelyn}"),  # a text answer is no unit
        (r"7\text{th}", "7"),
        (r"(1,2)", "(1,2)"),
        ("B", "B"),
        ("(b)", "(b)"),  # choices are capitals: (b) may be an interval's name or a variable
    ],
)
def test_normalize_notation(answer, normalized):
    assert normalize_notation(answer) == normalized


def test_grade_accepts_25_for_a_gold_25_percent():
    assert grade([r"25\%", r"25\%"], ["25", "26"], progress=False) == [Grade(True, True), Grade(False, False)]


def test_normalize_answer():
    assert normalize_answer(r" $\dfrac{3}{4}$. ") == r"\frac{3}{4}"
    assert normalize_answer("-12.00") == "-12"
    assert normalize_answer("12.50") == "12.50"


@pytest.mark.parametrize(
    ("gold", "pred", "expected"),
    [
        (r"\frac12", "0.5", True),
        (r"\dfrac{1}{2}", r"\frac{1}{2}", True),
        (r"(-\infty, 2]", r"(-\infty,2]", True),
        (r"[1, 3)", "[1,3]", False),
        (r"\{1,2\}", r"\{2,1\}", True),
        (r"\frac{\sqrt{2}}{2}", r"\sqrt2/2", True),
        (r"\text{Evelyn}", r"\text{Evelyn}", True),
        ("3", "4", False),
        (r"\frac{1}{2}", r"\frac{1}{3}", False),
        ("3", None, False),
    ],
)
def test_verify_answer(gold, pred, expected):
    assert verify_answer(gold, pred) is expected


def test_verify_answer_accepts_fractional_timeout():
    # math-verify's alarms take whole seconds and silently fail every answer given a float.
    assert verify_answer(r"\frac12", "0.5", timeout=0.5)


@pytest.mark.parametrize(
    "garbage", ["", "}", "{{{", r"\frac{", r"\left(", "x^^", "\\", "\x00", r"\boxed{", "$$$", "∞" * 50]
)
def test_verify_answer_never_raises(garbage):
    assert verify_answer("5", garbage) is False
    assert verify_answer(garbage, "5") is False


def test_verify_answer_needs_main_thread():
    errors = []

    def call():
        try:
            verify_answer("1", "1")
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    assert [str(e) for e in errors] == ["verify_answer needs the main thread (signal.alarm); use grade()"]


def test_verify_answer_gives_math_verify_whole_seconds_of_at_least_one(monkeypatch):
    """math-verify's alarms take whole seconds (a float is a TypeError it swallows): the timeout
    is rounded up, at least 1 s, for both parses and the comparison; 5 s by default."""
    import math_verify

    seen, parse, verify = [], math_verify.parse, math_verify.verify

    def parsing(text, parsing_timeout):
        seen.append(parsing_timeout)
        return parse(text, parsing_timeout=parsing_timeout)

    def comparing(gold, pred, timeout_seconds):
        seen.append(timeout_seconds)
        return verify(gold, pred, timeout_seconds=timeout_seconds)

    monkeypatch.setattr(math_verify, "parse", parsing)
    monkeypatch.setattr(math_verify, "verify", comparing)
    for timeout, seconds in [(0.2, 1), (2.5, 3), (None, 5)]:
        seen.clear()
        assert verify_answer("1", "1", *([timeout] if timeout else [])) and seen == [seconds] * 3


def test_an_answer_math_verify_cannot_parse_is_logged_and_incorrect(caplog):
    caplog.set_level(logging.DEBUG, logger=grading.__name__)
    assert not verify_answer("", "1") and not verify_answer("1", "")
    assert [r.getMessage() for r in caplog.records if r.name == grading.__name__] == [
        "math-verify cannot parse the gold answer ''", "math-verify cannot parse the answer ''"]


@pytest.mark.parametrize("error", [ValueError("boom"), "timeout"])
def test_an_error_inside_math_verify_is_logged_and_incorrect(monkeypatch, caplog, error):
    """An error, or math-verify's own timeout (a BaseException), grades the answer incorrect."""
    import math_verify
    from math_verify.errors import TimeoutException

    error = TimeoutException("alarm") if error == "timeout" else error

    def failing(gold, pred, timeout_seconds):
        raise error

    monkeypatch.setattr(math_verify, "verify", failing)
    caplog.set_level(logging.DEBUG, logger=grading.__name__)
    assert verify_answer("1", "1") is False
    assert [r.getMessage() for r in caplog.records if r.name == grading.__name__] == [
        f"math-verify failed on '1' vs '1': {error!r}"]


def test_math500_reference_answers_verify():
    """The last \\boxed{} of each reference solution is its gold answer, by math-verify."""
    rows = math500()
    assert len(rows) == 500
    failures = [
        (row["unique_id"], row["answer"], extract_boxed(row["solution"]))
        for row in rows
        if not verify_answer(row["answer"], extract_boxed(row["solution"]))
    ]
    for failure in failures:
        print("MATH500 answer does not verify:", failure)
    rate = 1 - len(failures) / len(rows)
    print(f"MATH500 verify rate: {rate:.4f}")
    assert rate >= 0.99


def test_math500_wrong_answers_rejected():
    """Each gold against the next row's gold: math-verify must not accept unrelated answers."""
    answers = [row["answer"] for row in math500()]
    accepted = [
        (gold, pred)
        for gold, pred in zip(answers, answers[1:] + answers[:1])
        if gold != pred and verify_answer(gold, pred)
    ]
    assert len(accepted) <= 5, accepted


@pytest.fixture(scope="module")
def mixed_answers() -> tuple[list[str], list[str | None]]:
    """60 MATH500 golds: right answers, wrong answers (the next gold) and missing ones."""
    rows = math500()[:60]
    golds = [row["answer"] for row in rows]
    preds = [
        extract_boxed(row["solution"]) if i % 3 == 0 else golds[(i + 1) % 60] if i % 3 == 1 else None
        for i, row in enumerate(rows)
    ]
    return golds, preds


def test_grade_inline(mixed_answers):
    golds, preds = mixed_answers
    grades = grade(golds, preds, progress=False)
    assert [g.correct for g in grades][:6] == [True, False, False, True, False, False]
    assert sum(g.correct for g in grades) >= 20
    assert all(g == Grade(True, True) for g in grades[::3])


def test_grade_pool_matches_inline(mixed_answers):
    golds, preds = mixed_answers
    assert grade(golds, preds, workers=2, progress=False) == grade(golds, preds, progress=False)


def test_a_pool_worker_builds_math_verify_before_its_first_answer(monkeypatch):
    """The warm-up parses and verifies a real pair, so imports and parsers are done before any
    answer's clock starts; each answer is then timed from its start, with the timeout it is given."""
    calls, real = [], grading.verify_answer

    def recording(gold, pred, timeout=5.0):
        calls.append((gold, pred, timeout, real(gold, pred, timeout)))
        return calls[-1][-1]

    monkeypatch.setattr(grading, "verify_answer", recording)
    started = multiprocessing.RawArray("d", 3)
    monkeypatch.setattr(grading, "_started", None)
    grading._init_worker(started)
    assert grading._started is started and calls == [("1", "1", 5.0, True)]
    before = time.time()
    assert grading._verify_item(2, "5", "5", 0.5) and calls[-1] == ("5", "5", 0.5, True)
    assert list(started[:2]) == [0.0, 0.0] and before <= started[2] <= time.time()


@pytest.fixture
def pools(monkeypatch) -> list[tuple[int, str]]:
    """(workers, start method) of each pool `grade` makes."""
    made = []

    class RecordingPool(grading.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append((self._max_workers, self._mp_context.get_start_method()))

    monkeypatch.setattr(grading, "ProcessPoolExecutor", RecordingPool)
    return made


def test_grade_pools_have_the_asked_workers_and_spawn_them(pools, mixed_answers):
    """`workers` processes, started by spawn: fork would copy the locks a caller's threads hold."""
    golds, preds = mixed_answers
    assert grade(golds[:3], preds[:3], workers=3, progress=False) == grade(golds[:3], preds[:3], progress=False)
    assert pools == [(3, "spawn")]


def test_grade_from_a_thread_uses_a_pool_of_one(pools, mixed_answers):
    golds, preds = mixed_answers
    results = {}
    thread = threading.Thread(target=lambda: results.update(grades=grade(golds, preds, progress=False)))
    thread.start()
    thread.join()
    assert results["grades"] == grade(golds, preds, progress=False) and pools == [(1, "spawn")]


def test_inline_grading_gives_math_verify_the_timeout(monkeypatch):
    timeouts = []
    monkeypatch.setattr(grading, "verify_answer", lambda gold, pred, timeout=None: timeouts.append(timeout) or True)
    grade(["1"], ["1"], timeout=2, progress=False)
    grade(["1"], ["1"], progress=False)
    assert timeouts == [2, 5.0]  # by default math-verify's own 5 s


def test_grading_shows_progress_unless_told_not_to(capsys):
    grade(["1", "2"], ["1", "3"])
    assert "2/2" in capsys.readouterr().err
    grade(["1", "2"], ["1", "3"], progress=False)
    assert capsys.readouterr().err == ""


def test_negative_workers_are_named():
    with pytest.raises(ValueError, match=r"^workers must be >= 0, got -1$"):
        grade(["1"], ["1"], workers=-1)


def test_grade_checks_lengths():
    with pytest.raises(ValueError, match="2 gold answers but 1"):
        grade(["1", "2"], ["1"], progress=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_grade_adversarial_is_bounded_and_incorrect(workers):
    start = time.monotonic()
    grades = grade(["5", "5"], [ADVERSARIAL, "5"], workers=workers, timeout=1, progress=False)
    assert grades == [Grade(False, False), Grade(True, True)]
    assert time.monotonic() - start < grading.wall_limit(1)


def test_the_wall_limit_leaves_room_for_math_verifys_own_timeouts():
    # Parsing the gold and the prediction, then comparing: four timeouts, and 5 s to spare.
    assert grading.wall_limit(5.0) == 25.0 and grading.wall_limit(0.5) == 7.0


class Interrupted(Exception):
    pass


class FailingBar:
    """A progress bar that fails at its first update, as a Ctrl-C or an error in the caller would."""

    def update(self, n: int = 1) -> None:
        self.failed_at = time.monotonic()
        raise Interrupted


def test_an_error_while_grading_kills_the_workers_at_once():
    """The pool's workers are killed, not left to finish their answers (three adversarial ones of
    about 3 s each here): a caller that fails or is interrupted gets control back at once."""
    bar = FailingBar()
    grader = grading._PoolGrader(["5"] * 4, ["5", ADVERSARIAL, ADVERSARIAL, ADVERSARIAL], 2, 3, bar)
    with pytest.raises(Interrupted):
        grader.run()
    assert time.monotonic() - bar.failed_at < 2
    assert multiprocessing.active_children() == []


def test_grade_tears_down_a_stuck_pool(monkeypatch, caplog):
    """An answer over the wall limit counts as incorrect and the pool is replaced.

    math-verify's alarms stop every slow input we found, so the wall limit is set below
    its 2 s timeout to make the adversarial answer overstay it.
    """
    monkeypatch.setattr(grading, "wall_limit", lambda timeout: 1.0)
    caplog.set_level(logging.WARNING, logger=grading.__name__)
    start = time.monotonic()
    grades = grade(["5", "5", r"\frac12"], [ADVERSARIAL, "5", "0.5"], workers=2, timeout=2, progress=False)
    assert [g.correct for g in grades] == [False, True, True]
    assert time.monotonic() - start < 30
    warnings = [r.getMessage() for r in caplog.records if r.name == grading.__name__]
    assert warnings == [f"answer 0 unchecked after 1.0 s: incorrect ({ADVERSARIAL!r})"]
    assert multiprocessing.active_children() == []  # the stuck pool's workers are gone
