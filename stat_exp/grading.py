"""Answer extraction and grading: math-verify equivalence plus a strict normalised-string match.

math-verify bounds its work with `signal.alarm`, which works only in a process's main thread
and only in whole seconds, and cannot stop code that never returns to the interpreter. So
`grade` checks answers inline only when called from the main thread with `workers=0`;
otherwise it uses a pool of worker processes, whose tasks run in each worker's main thread,
and a hard wall limit per answer that replaces a stuck pool rather than waiting on it.
"""

import logging
import math
import multiprocessing
import re
import threading
import time
from collections import deque
from ctypes import Array, c_double
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass

from tqdm import tqdm

logger = logging.getLogger(__name__)

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` or `\\fbox{...}` in `text` (`\\boxed 5` too).

    None when there is none, or when the last one's braces are unbalanced: an earlier box
    is not a fallback, since the final answer is the last one written.
    """
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :]
    body = rest.lstrip()
    if not body.startswith("{"):
        # The `\boxed 5` form: the answer runs to the end of the math ($) or of the line.
        answer = re.split(r"[$\n]", body, maxsplit=1)[0].strip()
        return answer if rest[:1].isspace() and answer else None
    depth = 0
    i = 0
    while i < len(body):
        char = body[i]
        if char == "\\":
            i += 2  # an escaped character (`\{`, `\}`, `\\`) never opens or closes the box
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return body[1:i].strip()
        i += 1
    return None


# A unit after the answer: `\text{ cm}`, `\mbox{inches}`, `\text{ cm}^2` (words only, so that
# `x\text{-axis}` or a whole `\text{(B)}` stays).
_RIGHT_UNIT = re.compile(r"^(?P<value>.*\S)\s*\\(?:text|mbox)\{\s*[A-Za-z][A-Za-z .]*\}(?:\^\{?[23]\}?)?$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_CHOICE = re.compile(r"^\\(?:text|textbf|mathrm)\{\s*(\(?[A-E]\)?)\s*\}$|^\(([A-E])\)$")


def normalize_notation(s: str) -> str:
    """`s` without the notation that the standard MATH harnesses ignore, for both metrics.

    As Hendrycks' `is_equiv` (`_strip_string`), Qwen2.5-Math's `strip_string` and lm-eval's
    minerva_math `normalize_final_answer` do: `\\!` and the other spacing commands, `\\$` and
    `$`, a unit in `\\text{}` after the answer, the percent sign, degrees, `dfrac`/`tfrac`,
    thousands separators (`10{,}000`, `10,000`; a comma elsewhere, as in `1,2`, separates list
    items and stays), and a multiple-choice letter written `(B)` or `\\text{(B)}` (`B`).
    """
    s = s.strip().replace("\\$", "").replace("$", "")
    s = re.sub(r"(?<!\\)\\[!,;: ]", "", s)  # spacing (`3\,000`, `x\!+\!1`), not a `\\` line break
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\^\{?\\circ\}?", "", s)
    unit = _RIGHT_UNIT.match(s)
    if unit:
        s = unit["value"].strip()
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("{,}", "")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    choice = _CHOICE.match(s)
    if choice:
        s = (choice[1] or choice[2]).strip("()")
    return s.strip()


def normalize_answer(s: str) -> str:
    """A canonical string form of an answer for the strict metric: only notation is removed."""
    s = normalize_notation(s)
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)  # `\text{Evelyn}` is `Evelyn`
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12 is \frac{1}{2}
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    return re.sub(r"^(-?\d+)\.0+$", r"\1", s)


def strict_match(gold: str, pred: str | None) -> bool:
    """Whether `pred` is `gold` up to notation (see `normalize_answer`); an empty answer never is."""
    if pred is None:
        return False
    normalized = normalize_answer(gold)
    return normalized != "" and normalized == normalize_answer(pred)


def verify_answer(gold: str, pred: str | None, timeout: float = 5.0) -> bool:
    """Whether `pred` is mathematically equivalent to `gold`, by math-verify.

    Both are bare answers (what `extract_boxed` returns); they are boxed so that math-verify's
    LaTeX extraction reads them whole. Bad input is never an error, only incorrect. Must run
    in the main thread: math-verify's timeouts are `signal.alarm`s (use `grade` elsewhere).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("verify_answer needs the main thread (signal.alarm); use grade()")
    if pred is None:
        return False
    # Imported here: sympy and the LaTeX parser take a second to import.
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    # math-verify passes its timeouts to signal.alarm, which takes whole seconds; a float is
    # a TypeError that math-verify swallows, and every answer would silently be wrong.
    seconds = max(1, math.ceil(timeout))
    try:
        # Gold first, and as verify's first argument: math-verify is not symmetric.
        # The harnesses' notation goes first (math-verify reads `25\\%` as 0.25, never as 25).
        gold, pred = normalize_notation(gold), normalize_notation(pred)
        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=seconds)
        if not gold_parsed:
            logger.debug("math-verify cannot parse the gold answer %r", gold)
            return False
        pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=seconds)
        if not pred_parsed:
            logger.debug("math-verify cannot parse the answer %r", pred)
            return False
        return verify(gold_parsed, pred_parsed, timeout_seconds=seconds)
    except (Exception, TimeoutException) as error:  # TimeoutException is a BaseException
        logger.debug("math-verify failed on %r vs %r: %r", gold, pred, error)
        return False


@dataclass(frozen=True)
class Grade:
    """One answer's two metrics."""

    correct: bool  # math-verify equivalence
    strict: bool  # normalised string equality


def grade(
    golds: Sequence[str],
    preds: Sequence[str | None],
    *,
    workers: int = 0,
    timeout: float = 5.0,
    progress: bool = True,
) -> list[Grade]:
    """Grades each answer against its gold one (None: no answer, incorrect).

    workers=0 grades in this process when called from its main thread; otherwise in a pool
    of `max(workers, 1)` processes. An answer still unchecked after `wall_limit(timeout)`
    seconds counts as incorrect.
    """
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold answers but {len(preds)} predictions")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    with tqdm(total=len(golds), desc="grading", disable=not progress) as bar:
        if workers == 0 and threading.current_thread() is threading.main_thread():
            correct = []
            for gold, pred in zip(golds, preds):
                correct.append(verify_answer(gold, pred, timeout))
                bar.update()
        else:
            correct = _PoolGrader(golds, preds, max(workers, 1), timeout, bar).run()
    return [Grade(c, strict_match(g, p)) for c, g, p in zip(correct, golds, preds)]


def wall_limit(timeout: float) -> float:
    """Seconds a pool worker may spend on one answer: math-verify's own timeouts (gold and
    prediction parsing, then comparisons) with room to spare."""
    return 4 * timeout + 5


_POLL_S = 0.25  # how often the pool looks for stuck answers
_IN_FLIGHT_PER_WORKER = 4  # submitted answers per worker: keeps workers busy, waits cheap

# In a worker: start times of answers by index, shared with the parent that watches them.
_started: "Array[c_double] | None" = None


def _init_worker(started: "Array[c_double]") -> None:
    global _started
    _started = started
    # Imports and builds math-verify's parsers before any answer's clock starts.
    verify_answer("1", "1")


def _verify_item(index: int, gold: str, pred: str | None, timeout: float) -> bool:
    _started[index] = time.time()
    return verify_answer(gold, pred, timeout)


class _PoolGrader:
    """Grades in worker processes; replaces the pool whenever an answer overstays its limit.

    A queued answer has not started, so the limit runs from the moment a worker records that
    it took the answer, not from submission (spawning and importing sympy take seconds).
    """

    def __init__(self, golds: Sequence[str], preds: Sequence[str | None], workers: int,
                 timeout: float, bar: tqdm) -> None:
        self.golds, self.preds, self.workers, self.timeout, self.bar = golds, preds, workers, timeout, bar
        # spawn, not fork: the caller may have threads (tqdm, torch) that fork would break.
        self.context = multiprocessing.get_context("spawn")
        self.started = self.context.RawArray("d", max(len(golds), 1))
        self.results: dict[int, bool] = {}

    def run(self) -> list[bool]:
        todo = list(range(len(self.golds)))
        while todo:
            todo = self._run_pool(todo)
        return [self.results[i] for i in range(len(self.golds))]

    def _run_pool(self, todo: list[int]) -> list[int]:
        """Grades `todo` in a fresh pool until done or stuck; returns what is left to grade."""
        for i in todo:
            self.started[i] = 0.0
        queue = deque(todo)
        running: dict[Future, int] = {}
        pool = ProcessPoolExecutor(self.workers, mp_context=self.context,
                                   initializer=_init_worker, initargs=(self.started,))
        limit = wall_limit(self.timeout)
        stuck: list[int] = []
        finished = False
        try:
            while queue or running:
                while queue and len(running) < _IN_FLIGHT_PER_WORKER * self.workers:
                    i = queue.popleft()
                    running[pool.submit(_verify_item, i, self.golds[i], self.preds[i], self.timeout)] = i
                done, _ = wait(running, timeout=_POLL_S, return_when=FIRST_COMPLETED)
                for future in done:
                    self.results[running.pop(future)] = future.result()
                    self.bar.update()
                now = time.time()
                stuck = [i for i in running.values() if self.started[i] and now - self.started[i] > limit]
                if stuck:
                    break
            finished = not stuck
        finally:
            if finished:
                pool.shutdown()
            else:
                _terminate(pool)
        for i in stuck:
            logger.warning("answer %d unchecked after %.1f s: incorrect (%r)", i, limit, self.preds[i])
            self.results[i] = False
            self.bar.update()
        return [i for i in todo if i not in self.results]


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Kills the workers, a stuck one included, and waits for the pool to wind down."""
    # ProcessPoolExecutor has no public handle on its processes before Python 3.14's
    # kill_workers(). SIGKILL: a worker holds nothing to clean up, and cannot ignore it.
    for process in list(pool._processes.values()):
        process.kill()
    # The pool's manager thread sees the dead workers, fails the futures left and reaps the
    # processes; joining them here as well would race it for their exit statuses.
    pool.shutdown(wait=True, cancel_futures=True)
