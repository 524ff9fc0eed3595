"""The teacher client: litellm calls, concurrent, retried, rate-limited, cached and paid for.

Each prompt kind goes to its own model (`teacher.models`, else `teacher.model`). Models litellm
sends through the openai SDK anyway (OpenAI, vLLM and other OpenAI-compatible servers) are called
through that SDK directly (`teacher.direct_openai`): litellm's own work per call, ~3 ms of CPU on
the one event loop, would cap a stage at a few hundred calls a second. Every answer
is stored in an SQLite cache keyed by (model, api_base, messages, sampling, sample index, attempt),
so a rerun, or another member of a sweep, gets it back without a call. Answers the parser rejects
are retried with fresh samples and, when every attempt fails, kept raw and counted.
`max_cost_usd` stops new calls once a run has spent it; what was paid is cached. An error no
retry can fix (a rejected key, an unknown model, ...) stops every request at once with one
TeacherFatalError that says what to do.
"""

import asyncio
import hashlib
import json
import logging
import os
import random
import socket
import sqlite3
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable, Generic, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf

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


class TeacherFatalError(RuntimeError):
    """An error no retry can fix (credentials, permission, model, request, api_base); says how to fix it."""


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
    cached_prompt_tokens: int = 0  # prompt tokens the provider read from its prompt cache (billed lower)
    cost_usd: float = 0.0
    cache_savings_usd: float = 0.0  # what those cached tokens would have cost at the full input price, less their cost
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
        out["cache_savings_usd"] = round(self.cache_savings_usd, 6)
        return out


class AnswerCache:
    """(request key) -> answer JSON in one SQLite file, safe to share between processes."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # A commit then waits for no fsync (~2 ms each, on the event loop): it survives a killed run,
        # and a power cut loses at most the last answers, which a rerun asks again.
        self.db.execute("PRAGMA synchronous=NORMAL")
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
        # A plain dataclass: an OmegaConf attribute read costs ~0.1 ms, and each request makes a dozen.
        self.cfg = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg
        self.cache = AnswerCache(Path(cache_dir) / "teacher.sqlite")
        self.usage = Usage()
        unknown = sorted(set(cfg.models) - set(cfg.sampling))
        if unknown:
            raise ValueError(f"teacher.models names unknown prompt kinds {unknown}; known: {sorted(cfg.sampling)}")
        self._api_key = _api_key(cfg)  # held in memory only: never in a config, log or artifact
        self._budget_hit = False
        # When the next request may start under requests_per_minute: kept across ask() calls, so a
        # stage that asks in several batches keeps the spacing at each batch's start.
        self._next_start = time.monotonic()
        self.unparsed_answers: list[str] = []  # raw answers no attempt could parse, shown when a stage fails on them
        self.error_examples: dict[str, str] = {}  # one message per kind of failed request
        self._fatal: TeacherFatalError | None = None  # the first unfixable error: nothing is sent after it
        self._answered = False  # whether the provider has answered once (see _unfixable)
        self._priced: dict[str, bool] = {}  # model -> whether litellm's price table has it

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
        self._cache_model = {}  # prompt kind -> the model name its cache keys carry
        for kind in {r.kind for r in requests}:
            model = model_for(self.cfg, kind)
            self._cache_model[kind] = model
            if oracle.serves(model):
                oracle.ensure_registered()
                # Its answers change with its code and world, which the prompt alone does not pin.
                self._cache_model[kind] = f"{model}@{oracle.fingerprint()}"
        self._litellm = litellm
        self._direct = {}  # model -> its name at an OpenAI-compatible endpoint, for models called through the SDK
        if self.cfg.direct_openai:
            for model in {model_for(self.cfg, r.kind) for r in requests}:
                name, provider, _, _ = litellm.get_llm_provider(model, api_base=self.cfg.api_base)
                if provider == "openai" and not oracle.serves(model):
                    self._direct[model] = name
        self._sdk_clients = {}  # model -> openai.AsyncOpenAI, bound to this ask()'s event loop
        self._sdk_params = {}  # (model, sampling) -> the request's parameters, as litellm maps them
        self._slots = asyncio.Semaphore(self.cfg.concurrency)
        # Batch mode: the Batch API answers the first attempts the cache lacks; the rest is online.
        self._batched = await batch.answer_uncached(self, requests) if self.cfg.batch else {}
        replies: list = [None] * len(requests)
        with tqdm(total=len(requests), desc=desc, unit="req") as bar:

            async def one(i: int) -> None:
                replies[i] = await self._ask_one(requests[i], parsers[i])
                bar.update()

            tasks = [asyncio.create_task(one(i)) for i in range(len(requests))]
            try:
                await asyncio.gather(*tasks)
            except TeacherFatalError:
                for task in tasks:  # requests in flight or waiting for a slot: none of them can succeed
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            finally:
                for client in self._sdk_clients.values():
                    await client.close()
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
        return _cache_key(self._cache_model[request.kind], request, params, attempt, api_base=self.cfg.api_base), params

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
            if self._fatal is not None:  # another request met it while this one waited for its slot
                raise self._fatal
            if self._over_budget():
                return None
            answer = await self._call_with_retries(request, params)
        if answer.get("error") is None:  # failures are not cached: a rerun tries them again
            self.cache.put(key, answer)
        return answer

    async def _call_with_retries(self, request: Request, params: dict) -> dict:
        import openai

        litellm = self._litellm
        model = model_for(self.cfg, request.kind)
        # litellm's exceptions subclass the openai SDK's, so these catch both paths' errors.
        retryable = (
            openai.RateLimitError,
            openai.InternalServerError,
            litellm.ServiceUnavailableError,
            litellm.BadGatewayError,
            openai.APIConnectionError,  # time-outs included
        )
        for retry in range(self.cfg.max_retries + 1):
            await self._wait_for_rate_limit()
            try:
                if oracle.serves(model):  # sampling settings do not change the oracle's answers
                    response = oracle.complete(model, list(request.messages), kind=request.kind, sample=request.sample)
                    cost = None  # free, and absent from litellm's price table: counted as unpriced, as litellm does
                elif model in self._direct:
                    response = await self._sdk_complete(model, request, params)
                    cost = self._sdk_cost(model, response.usage)
                else:
                    response = await litellm.acompletion(
                        model=model,
                        messages=list(request.messages),
                        api_base=self.cfg.api_base,
                        api_key=self._api_key,
                        timeout=self.cfg.timeout,
                        num_retries=0,  # retries are ours, counted and backed off here
                        max_retries=0,
                        drop_params=True,  # providers that lack a sampling knob ignore it rather than fail
                        **params,
                    )
                    # litellm prices every response at the model called, cache reads at the provider's
                    # cache price; None: the model is missing from its price table (a local server).
                    cost = response._hidden_params.get("response_cost")
            except Exception as err:
                reason = self._unfixable(err, model, request.kind)
                if reason is None and not isinstance(err, retryable):
                    raise
                if reason is not None:
                    self._fatal = self._fatal or TeacherFatalError(reason)
                    raise self._fatal from None  # the provider's traceback says nothing the message does not
                if retry == self.cfg.max_retries:
                    kind = type(err).__name__
                    self.usage.failed += 1
                    self.usage.errors[kind] = self.usage.errors.get(kind, 0) + 1
                    self.error_examples.setdefault(kind, f"{kind}: {_short(err)}")
                    log.debug("teacher request failed after %d retries: %s", retry, _short(err))
                    return {"content": None, "error": f"{kind}: {_short(err)}"}
                self.usage.retries += 1
                delay = _retry_after(err)  # the provider's own word on when to come back wins
                if delay is None:
                    delay = min(self.cfg.backoff_max, self.cfg.backoff_initial * 2**retry)
                    delay *= 0.5 + random.random() / 2
                await asyncio.sleep(delay)
                continue
            self._answered = True
            return self._account(response, model, cost)
        raise AssertionError("unreachable: the loop returns on its last retry")

    def _unfixable(self, err: Exception, model: str, kind: str) -> str | None:
        """What is wrong and how to fix it, when `err` is one no retry can fix; else None.

        litellm reports a missing OpenAI key and a refused connection as InternalServerError (500),
        so the exception's causes are read too. A refused connection or an unknown host is fatal
        only until the server has answered once: later it is a restart or a network blip, retried.
        """
        import openai

        litellm = self._litellm
        status = getattr(err, "status_code", None)
        causes = _causes(err)
        where = f"the server at teacher.api_base={self.cfg.api_base}" if self.cfg.api_base else "the provider"
        # litellm's words for a missing OpenAI key, then the SDK's
        missing = ("credentials", "api_key client option must be set")
        if any(type(c).__name__ == "OpenAIError" and any(m in str(c) for m in missing) for c in causes) or (
            isinstance(err, openai.AuthenticationError) and "missing" in str(err).lower()
        ):
            key = self.cfg.api_key_env or _key_variable(litellm, model)
            return f"{key} is not set: export it, or choose teacher=local or teacher=oracle"
        if isinstance(err, openai.AuthenticationError) or status == 401:
            if self.cfg.api_base and not self.cfg.api_key_env:
                return f"{where} asks for an API key (401): set teacher.api_key_env to the variable that holds it"
            key = self.cfg.api_key_env or _key_variable(litellm, model)
            return f"{key} was rejected (401) by {where}: export a valid key, or choose teacher=local or teacher=oracle"
        if isinstance(err, openai.PermissionDeniedError) or status == 403:
            return (f"{where} denied access to {model} (403): check that the key's account may use it, "
                    f"or choose another model (teacher.model, teacher.models.{kind})")
        if isinstance(err, openai.NotFoundError) or status == 404:
            also = " and teacher.api_base" if self.cfg.api_base else ""
            return (f"{where} does not know the model {model!r} (404): check teacher.model or teacher.models.{kind}"
                    f"{also} (litellm names look like openai/gpt-4o-mini)")
        if isinstance(err, litellm.ContextWindowExceededError) or getattr(err, "code", "") == "context_length_exceeded":
            return (f"a {kind} prompt is longer than {model}'s context window: choose a model with a longer "
                    f"context for it (teacher.models.{kind}) or shorten the prompt")
        if isinstance(err, openai.BadRequestError) or status == 400:
            return (f"{where} rejected a {kind} request to {model} as invalid (400: {self._scrub(_short(err))}): "
                    f"check teacher.sampling.{kind} and the model name")
        if not self._answered and any(isinstance(c, (ConnectionRefusedError, socket.gaierror)) for c in causes):
            target = self.cfg.api_base or model
            return (f"cannot reach {target} (connection refused or unknown host): start the server there, "
                    "or fix teacher.api_base")
        return None

    def _scrub(self, text: str) -> str:
        """`text` without the API key, should a provider echo it."""
        return text.replace(self._api_key, "***") if self._api_key and len(self._api_key) > 4 else text

    async def _sdk_complete(self, model: str, request: Request, params: dict) -> Any:
        """One call through the openai SDK, with the parameters litellm would send for `model`."""
        import openai
        from openai.types.chat import ChatCompletion

        client = self._sdk_clients.get(model)
        if client is None:  # the SDK reads OPENAI_API_KEY when given none, and says when it is not set
            # litellm's order: the config, then OPENAI_BASE_URL (which the SDK reads), then OPENAI_API_BASE
            base_url = self.cfg.api_base or os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_BASE")
            client = openai.AsyncOpenAI(api_key=self._api_key, base_url=base_url, max_retries=0,
                                        timeout=self.cfg.timeout)
            self._sdk_clients[model] = client
        sampling = tuple(sorted(params.items()))
        if (model, sampling) not in self._sdk_params:
            # litellm's own mapping, once per model and sampling: max_completion_tokens for reasoning
            # models, knobs a model lacks dropped (as drop_params does on litellm's path).
            from litellm.utils import get_optional_params

            mapped = get_optional_params(model=self._direct[model], custom_llm_provider="openai", drop_params=True,
                                         **params)
            # its defaults (stream=False, an empty extra_body), left out as litellm's own call leaves them out
            self._sdk_params[(model, sampling)] = {k: v for k, v in mapped.items() if k != "stream" and v != {}}
        # The SDK's raw post: the body is plain JSON already, and create()'s type-driven transform of it
        # costs a fifth of the SDK's CPU a call. The answer is parsed into the same ChatCompletion.
        body = {"model": self._direct[model], "messages": list(request.messages), **self._sdk_params[(model, sampling)]}
        return await client.post("/chat/completions", cast_to=ChatCompletion, body=body)

    def priced(self, model: str) -> bool:
        """Whether litellm's price table has `model` (a local server's model is counted as unpriced)."""
        if model not in self._priced:
            try:
                self._litellm.get_model_info(model)
                self._priced[model] = True
            except self._litellm.exceptions.ModelNotMappedError:
                self._priced[model] = False
        return self._priced[model]

    def _sdk_cost(self, model: str, usage: Any) -> float | None:
        """What litellm's price table charges for `usage` at `model`; None when the table lacks it."""
        if not self.priced(model):
            return None
        return sum(self._litellm.cost_per_token(model=model, prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                                                completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
                                                cache_read_input_tokens=_cached_tokens(usage)))

    def _account(self, response: Any, model: str, cost: float | None) -> dict:
        usage = getattr(response, "usage", None)
        prompt = getattr(usage, "prompt_tokens", 0) or 0
        completion = getattr(usage, "completion_tokens", 0) or 0
        cached = _cached_tokens(usage)
        if cost is None:
            self.usage.unpriced_calls += 1
            cost = 0.0
        elif cached:
            full = sum(self._litellm.cost_per_token(model=model, prompt_tokens=prompt, completion_tokens=completion))
            self.usage.cache_savings_usd += full - cost
        self.usage.calls += 1
        self.usage.prompt_tokens += prompt
        self.usage.completion_tokens += completion
        self.usage.cached_prompt_tokens += cached
        self.usage.cost_usd += cost
        content = response.choices[0].message.content
        return {"content": content, "prompt_tokens": prompt, "completion_tokens": completion,
                "cached_prompt_tokens": cached, "cost_usd": cost}

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


def model_for(cfg: TeacherConfig, kind: str) -> str:
    """The litellm model that answers prompts of `kind`: teacher.models[kind], else teacher.model."""
    return cfg.models.get(kind) or cfg.model


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


def _causes(err: BaseException) -> list[BaseException]:
    """`err` and the exceptions it was raised from, outermost first."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _key_variable(litellm: Any, model: str) -> str:
    """The environment variable litellm reads the key for `model` from (OPENAI_API_KEY, ...)."""
    missing = litellm.validate_environment(model).get("missing_keys") or []
    if missing:
        return missing[0]
    return f"{litellm.get_llm_provider(model)[1].upper()}_API_KEY"


def _retry_after(err: Exception) -> float | None:
    """Seconds the provider asked to wait (Retry-After: seconds or an HTTP date), if it did."""
    headers = getattr(getattr(err, "response", None), "headers", None) or {}
    if headers.get("retry-after-ms"):  # OpenAI's, finer than Retry-After
        try:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):  # neither form: back off as usual
        return None


def _cached_tokens(usage: Any) -> int:
    """Prompt tokens read from the provider's prompt cache: OpenAI's field, or Anthropic's."""
    details = getattr(usage, "prompt_tokens_details", None)
    return getattr(details, "cached_tokens", None) or getattr(usage, "cache_read_input_tokens", None) or 0


def _short(err: Exception) -> str:
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__
