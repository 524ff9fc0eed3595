"""The teacher client: litellm calls, concurrent, retried, rate-limited, cached and paid for.

Every answer is stored in an SQLite cache keyed by (model, api_base, messages, sampling, sample
index, attempt), so a rerun, or another member of a sweep, gets it back without a call. Answers the
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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Generic, Sequence, TypeVar

from stat_exp.config import TeacherConfig
from stat_exp.teacher import oracle
from stat_exp.teacher.parsers import ParseError

log = logging.getLogger(__name__)
T = TypeVar("T")

# litellm fetches its price table from GitHub at import unless told to use the bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


class BudgetExceeded(RuntimeError):
    """The run spent teacher.max_cost_usd; every answer paid for so far is cached."""


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


@dataclass
class Usage:
    calls: int = 0  # HTTP requests that returned an answer
    cache_hits: int = 0
    retries: int = 0  # requests repeated after a rate limit, 5xx, connection error or time-out
    failed: int = 0  # requests that failed after every retry
    parse_failures: int = 0  # answers the parser rejected (each retry counts)
    unparsed: int = 0  # requests left without a parsed answer after every attempt
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    unpriced_calls: int = 0  # calls to models missing from litellm's price table (local servers)

    def since(self, before: "Usage") -> "Usage":
        return Usage(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)})

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

    def ask(
        self,
        requests: Sequence[Request],
        parse: Callable[[str], T] | Sequence[Callable[[str], T]],
        *,
        desc: str = "teacher",
    ) -> list[Reply[T]]:
        """One reply per request, in order, parsed by `parse` (or by `parse[i]` for request i).

        Raises BudgetExceeded once the budget is spent, after caching every answer paid for.
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
        return replies

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
        replies: list = [None] * len(requests)
        with tqdm(total=len(requests), desc=desc, unit="req") as bar:

            async def one(i: int) -> None:
                replies[i] = await self._ask_one(requests[i], parsers[i])
                bar.update()

            await asyncio.gather(*(one(i) for i in range(len(requests))), return_exceptions=False)
        return replies

    async def _ask_one(self, request: Request, parse: Callable[[str], T]) -> Reply[T] | None:
        raw, error = None, None
        for attempt in range(self.cfg.parse_retries + 1):
            answer = await self._complete(request, attempt)
            if answer is None:  # the budget is spent: leave the request unanswered
                return None
            raw = answer.get("content")
            if answer.get("error"):
                error = answer["error"]
                break
            try:
                return Reply(request, parse(raw or ""), raw, None, attempt + 1)
            except ParseError as err:
                self.usage.parse_failures += 1
                error = f"unparsable answer: {err}"
                log.debug("%s attempt %d: %s", request.kind, attempt, err)
        self.usage.unparsed += 1
        return Reply(request, None, raw, error, attempt + 1)

    async def _complete(self, request: Request, attempt: int) -> dict | None:
        """The answer to `request` at `attempt`: from the cache, or from the provider."""
        sampling = self.cfg.sampling.get(request.kind)
        if sampling is None:
            raise KeyError(f"no teacher.sampling entry for prompt kind {request.kind!r}")
        temperature = sampling.temperature
        if attempt > 0:
            temperature = max(temperature, self.cfg.parse_retry_temperature)
        params = {"temperature": temperature, "max_tokens": sampling.max_tokens}
        key = _cache_key(self._cache_model, request, params, attempt, api_base=self.cfg.api_base)
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
                    self.usage.failed += 1
                    log.warning("teacher request failed after %d retries: %s", retry, _short(err))
                    return {"content": None, "error": f"{type(err).__name__}: {_short(err)}"}
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


def _cache_key(model: str, request: Request, params: dict, attempt: int, *, api_base: str | None = None) -> str:
    # Two servers can serve different weights under one model name: where it was asked is part of the answer.
    payload = {"model": model, "api_base": api_base, "messages": request.messages, "params": params,
               "sample": request.sample, "attempt": attempt}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _short(err: Exception) -> str:
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__
