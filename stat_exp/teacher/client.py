"""The teacher client: litellm calls, concurrent, retried, rate-limited, cached and paid for.

Every answer is stored in an SQLite cache keyed by (model, messages, sampling, sample index,
attempt), so a rerun, or another member of a sweep, gets it back without a call. Answers the
parser rejects are retried with fresh samples and, when every attempt fails, kept raw and
counted. `max_cost_usd` stops new calls once a run has spent it; what was paid is cached.
"""

import asyncio
import hashlib
import json
import logging
import os
import random
import sqlite3
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Generic, Sequence, TypeVar

from stat_exp.config import TeacherConfig
from stat_exp.store import IncompleteArtifact
from stat_exp.teacher import batch, oracle
from stat_exp.teacher.parsers import ParseError

log = logging.getLogger(__name__)
T = TypeVar("T")

# litellm fetches its price table from GitHub at import unless told to use the bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


class BudgetExceeded(RuntimeError):
    """The run spent teacher.max_cost_usd; every answer paid for so far is cached."""


class TeacherFailed(IncompleteArtifact):
    """More requests failed after every retry than teacher.max_failed allows; the answered ones are cached."""


@dataclass(frozen=True)
class Request:
    kind: str  # the prompt kind: selects the sampling parameters
    messages: tuple  # chat messages as ({"role": ..., "content": ...}, ...)
    sample: int = 0  # index among independent samples of the same prompt


@dataclass
class Reply(Generic[T]):
    request: Request
    parsed: T | None  # the parser's result; None when no attempt parsed
    raw: str | None  # the last answer's text (kept when it could not be parsed)
    error: str | None  # why parsed is None
    attempts: int
    failed: bool = False  # the request itself failed after every retry (no answer to parse)


@dataclass
class Usage:
    requests: int = 0  # requests asked (each may take several calls: retries, parse retries)
    calls: int = 0  # HTTP requests that returned an answer
    cache_hits: int = 0
    retries: int = 0  # requests repeated after a rate limit, 5xx, connection error or time-out
    failed: int = 0  # requests that failed after every retry
    errors: dict[str, int] = field(default_factory=dict)  # failed requests by kind of error
    parse_failures: int = 0  # answers the parser rejected (each retry counts)
    unparsed: int = 0  # requests left without a parsed answer after every attempt
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    unpriced_calls: int = 0  # calls to models missing from litellm's price table (local servers)

    def since(self, before: "Usage") -> "Usage":
        delta = {f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self) if f.name != "errors"}
        errors = {k: n - before.errors.get(k, 0) for k, n in self.errors.items() if n > before.errors.get(k, 0)}
        return Usage(**delta, errors=errors)

    def snapshot(self) -> "Usage":
        return replace(self, errors=dict(self.errors))

    def as_dict(self) -> dict:
        out = asdict(self)
        out["cost_usd"] = round(self.cost_usd, 6)
        return out


class AnswerCache:
    """(request key) -> answer JSON in one SQLite file, safe to share between processes."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def get(self, key: str) -> dict | None:
        row = self.db.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?)", (key, json.dumps(value)))

    def close(self) -> None:
        self.db.close()


class Teacher:
    def __init__(self, cfg: TeacherConfig, cache_dir: Path):
        self.cfg = cfg
        self.cache = AnswerCache(Path(cache_dir) / "teacher.sqlite")
        self.usage = Usage()
        self._api_key = _api_key(cfg)  # held in memory only: never in a config, log or artifact
        self._budget_hit = False
        self._oracle = oracle.serves(cfg.model)  # skillworld's teacher, a litellm custom provider
        self.unparsed_answers: list[str] = []  # raw answers no attempt could parse, shown when a stage fails on them
        self.error_examples: dict[str, str] = {}  # one message per kind of failed request

    def ask(
        self,
        requests: Sequence[Request],
        parse: Callable[[str], T] | Sequence[Callable[[str], T]],
        *,
        desc: str = "teacher",
    ) -> list[Reply[T]]:
        """One reply per request, in order, parsed by `parse` (or by `parse[i]` for request i).

        Raises BudgetExceeded once the budget is spent, after caching every answer paid for, and
        TeacherFailed when more than `teacher.max_failed` requests failed after every retry, after
        the others were answered and cached (so a rerun asks only for the failed ones).
        """
        parsers = list(parse) if isinstance(parse, Sequence) else [parse] * len(requests)
        if len(parsers) != len(requests):
            raise ValueError(f"{len(parsers)} parsers for {len(requests)} requests")
        replies = asyncio.run(self._ask_all(list(requests), parsers, desc))
        if self._budget_hit:
            done = sum(r is not None for r in replies)
            raise BudgetExceeded(
                f"teacher budget of ${self.cfg.max_cost_usd} reached (${self.usage.cost_usd:.4f} spent): "
                f"{done} of {len(requests)} {desc} requests answered and cached; raise teacher.max_cost_usd "
                "and rerun to resume without paying for them again"
            )
        failed = [r for r in replies if r.failed]
        if failed:
            errors = Counter(r.error.split(":", 1)[0] for r in failed)
            log.warning("%s: %d of %d requests failed after every retry: %s", desc, len(failed), len(requests),
                        "; ".join(f"{n} x {self.error_examples.get(kind, kind)}" for kind, n in errors.most_common()))
            if len(failed) > self.cfg.max_failed:
                raise TeacherFailed(self.failure_report(len(failed), len(requests), errors, desc))
        return replies

    def failure_report(self, failed: int, requests: int, errors: dict[str, int], desc: str) -> str:
        """One message for a stage whose requests failed: how many, of which kinds, and how to resume."""
        kinds = "; ".join(f"{n} x {self.error_examples.get(kind, kind)}"
                          for kind, n in sorted(errors.items(), key=lambda kv: -kv[1]))
        return (f"{failed} of {requests} teacher requests ({desc}) failed after every retry: {kinds}. "
                f"The {requests - failed} answered are cached, so a rerun asks only for the failed ones; "
                f"nothing was stored for this stage (teacher.max_failed={self.cfg.max_failed} accepts that many)")

    async def _ask_all(self, requests: list[Request], parsers: list[Callable[[str], T]], desc: str) -> list:
        import litellm
        from tqdm import tqdm

        litellm.suppress_debug_info = True
        # litellm logs a line per call at INFO (on its own handler too): thousands in a stage.
        logging.getLogger("LiteLLM").setLevel(logging.WARNING)
        self._cache_model = self.cfg.model
        if self._oracle:
            oracle.ensure_registered()
            # Its answers change with its code and world, which the prompt alone does not pin.
            self._cache_model = f"{self.cfg.model}@{oracle.fingerprint()}"
        self._litellm = litellm
        self._slots = asyncio.Semaphore(self.cfg.concurrency)
        self._next_start = time.monotonic()
        # Batch mode: the Batch API answers the first attempts the cache lacks; the rest is online.
        self._batched = await batch.answer_uncached(self, requests) if self.cfg.batch else {}
        replies: list = [None] * len(requests)
        with tqdm(total=len(requests), desc=desc, unit="req") as bar:

            async def one(i: int) -> None:
                replies[i] = await self._ask_one(requests[i], parsers[i])
                bar.update()

            await asyncio.gather(*(one(i) for i in range(len(requests))), return_exceptions=False)
        return replies

    async def _ask_one(self, request: Request, parse: Callable[[str], T]) -> Reply[T] | None:
        self.usage.requests += 1
        raw, error = None, None
        for attempt in range(self.cfg.parse_retries + 1):
            answer = await self._complete(request, attempt)
            if answer is None:  # the budget is spent: leave the request unanswered
                return None
            raw = answer.get("content")
            if answer.get("error"):
                return Reply(request, None, None, answer["error"], attempt + 1, failed=True)
            try:
                return Reply(request, parse(raw or ""), raw, None, attempt + 1)
            except ParseError as err:
                self.usage.parse_failures += 1
                error = f"unparsable answer: {err}"
                log.debug("%s attempt %d: %s", request.kind, attempt, err)
        self.usage.unparsed += 1
        self.unparsed_answers.append(raw or "")
        return Reply(request, None, raw, error, attempt + 1)

    def _keyed(self, request: Request, attempt: int) -> tuple[str, dict]:
        """The cache key and sampling parameters of `request` at `attempt`."""
        sampling = self.cfg.sampling.get(request.kind)
        if sampling is None:
            raise KeyError(f"no teacher.sampling entry for prompt kind {request.kind!r}")
        temperature = sampling.temperature
        if attempt > 0:
            temperature = max(temperature, self.cfg.parse_retry_temperature)
        params = {"temperature": temperature, "max_tokens": sampling.max_tokens}
        return _cache_key(self._cache_model, request, params, attempt), params

    async def _complete(self, request: Request, attempt: int) -> dict | None:
        """The answer to `request` at `attempt`: from this run's batches, the cache, or the provider."""
        key, params = self._keyed(request, attempt)
        if key in self._batched:  # paid for and counted when the batch was fetched
            return self._batched.pop(key)
        cached = self.cache.get(key)
        if cached is not None:
            self.usage.cache_hits += 1
            return cached
        async with self._slots:
            if self._over_budget():
                return None
            answer = await self._call_with_retries(request, params)
        if answer.get("error") is None:  # failures are not cached: a rerun tries them again
            self.cache.put(key, answer)
        return answer

    async def _call_with_retries(self, request: Request, params: dict) -> dict:
        litellm = self._litellm
        retryable = (
            litellm.RateLimitError,
            litellm.InternalServerError,
            litellm.ServiceUnavailableError,
            litellm.BadGatewayError,
            litellm.APIConnectionError,
            litellm.Timeout,
        )
        for retry in range(self.cfg.max_retries + 1):
            await self._wait_for_rate_limit()
            try:
                response = await litellm.acompletion(
                    model=self.cfg.model,
                    messages=list(request.messages),
                    api_base=self.cfg.api_base,
                    api_key=self._api_key,
                    timeout=self.cfg.timeout,
                    num_retries=0,  # retries are ours, counted and backed off here
                    max_retries=0,
                    drop_params=True,  # providers that lack a sampling knob ignore it rather than fail
                    # The oracle reads the prompt kind and sample index from here (litellm hands
                    # metadata to custom providers, it is not sent to real ones; only the oracle gets it).
                    **({"metadata": {"kind": request.kind, "sample": request.sample}} if self._oracle else {}),
                    **params,
                )
            except retryable as err:
                if retry == self.cfg.max_retries:
                    kind = type(err).__name__
                    self.usage.failed += 1
                    self.usage.errors[kind] = self.usage.errors.get(kind, 0) + 1
                    self.error_examples.setdefault(kind, f"{kind}: {_short(err)}")
                    log.debug("teacher request failed after %d retries: %s", retry, _short(err))
                    return {"content": None, "error": f"{kind}: {_short(err)}"}
                self.usage.retries += 1
                delay = min(self.cfg.backoff_max, self.cfg.backoff_initial * 2**retry)
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                continue
            return self._account(response)
        raise AssertionError("unreachable: the loop returns on its last retry")

    def _account(self, response: Any) -> dict:
        usage = getattr(response, "usage", None)
        prompt = getattr(usage, "prompt_tokens", 0) or 0
        completion = getattr(usage, "completion_tokens", 0) or 0
        cost = self._price(prompt, completion)
        self.usage.calls += 1
        self.usage.prompt_tokens += prompt
        self.usage.completion_tokens += completion
        self.usage.cost_usd += cost
        content = response.choices[0].message.content
        return {"content": content, "prompt_tokens": prompt, "completion_tokens": completion, "cost_usd": cost}

    def _price(self, prompt_tokens: int, completion_tokens: int) -> float:
        try:
            prompt_cost, completion_cost = self._litellm.cost_per_token(
                model=self.cfg.model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
            )
        except self._litellm.exceptions.ModelNotMappedError:
            self.usage.unpriced_calls += 1
            return 0.0
        return prompt_cost + completion_cost

    def _over_budget(self) -> bool:
        limit = self.cfg.max_cost_usd
        if limit is not None and self.usage.cost_usd >= limit:
            self._budget_hit = True
        return self._budget_hit

    async def _wait_for_rate_limit(self) -> None:
        if not self.cfg.requests_per_minute:
            return
        # Request starts are spaced evenly: a steady rate never trips a per-minute limit.
        now = time.monotonic()
        start = max(now, self._next_start)
        self._next_start = start + 60.0 / self.cfg.requests_per_minute
        await asyncio.sleep(start - now)


def _api_key(cfg: TeacherConfig) -> str | None:
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise ValueError(f"teacher.api_key_env={cfg.api_key_env!r} but that environment variable is not set")
        return key
    # OpenAI-compatible local servers need some key in the header, and ignore it.
    return "EMPTY" if cfg.api_base else None


def _cache_key(model: str, request: Request, params: dict, attempt: int) -> str:
    payload = {"model": model, "messages": request.messages, "params": params,
               "sample": request.sample, "attempt": attempt}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _short(err: Exception) -> str:
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__
