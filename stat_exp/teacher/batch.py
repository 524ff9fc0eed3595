"""Batch mode: a stage's uncached first attempts through the provider's Batch API, at its batch price.

With `teacher.batch`, `Teacher.ask` hands this module every request whose first attempt is not
in the answer cache. They are written as one JSONL file (the cache key is each line's
`custom_id`), uploaded, and run as a batch through litellm's files and batches API; the answers
land in the cache under the same keys as online answers, so the two modes share them. A
batch's id and keys are recorded in the cache's SQLite file as soon as the provider accepts it:
a killed run polls the same batch again and never submits it twice. An expired (or cancelled)
batch keeps what it finished and the rest is sent in a new one; a failed one raises.

Answers the parser rejects are retried through the online path, as are requests the provider
failed inside a completed batch: they are few, and a second batch would add up to a day.
"""

import asyncio
import json
import logging
import time
from importlib.metadata import version
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from stat_exp.teacher.client import Request, Teacher

log = logging.getLogger(__name__)

# Whose batches litellm 1.110 creates from OpenAI-format request lines. It reads Anthropic
# batches and their results but cannot create one.
PROVIDERS = ("openai",)
ENDED = ("completed", "expired", "cancelled", "failed")


class BatchFailed(RuntimeError):
    """The provider rejected a batch as a whole (a malformed request file, a quota)."""


class Ledger:
    """The batches submitted for the cache, in a table of its SQLite file: id, keys, status."""

    def __init__(self, db):
        self.db = db
        self.db.execute("CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, keys TEXT NOT NULL, "
                        "status TEXT NOT NULL, submitted REAL NOT NULL)")

    def add(self, batch_id: str, keys: Sequence[str]) -> None:
        self.db.execute("INSERT INTO batches VALUES (?, ?, 'submitted', ?)",
                        (batch_id, json.dumps(list(keys)), time.time()))

    def in_flight(self, wanted: set[str]) -> list[tuple[str, list[str]]]:
        """(id, keys) of the batches still running that hold any of `wanted` (keys name the model)."""
        rows = self.db.execute("SELECT id, keys FROM batches WHERE status = 'submitted' ORDER BY submitted")
        return [(batch_id, keys) for batch_id, keys in ((i, json.loads(k)) for i, k in rows) if wanted & set(keys)]

    def close(self, batch_id: str, status: str) -> None:
        self.db.execute("UPDATE batches SET status = ? WHERE id = ?", (status, batch_id))


async def answer_uncached(teacher: "Teacher", requests: Sequence["Request"]) -> dict[str, dict]:
    """Answers, by cache key, to the first attempts of `requests` the cache lacks, each cached.

    Requests left out (the provider failed them, or the budget was spent before a batch was
    submitted) are not answered here: the online path asks for them.
    """
    if teacher.cfg.batch_max_requests < 1:
        raise ValueError(f"teacher.batch_max_requests={teacher.cfg.batch_max_requests}: a batch holds at least 1")
    from stat_exp.teacher.client import model_for

    by_model: dict[str, list] = {}
    for request in requests:
        by_model.setdefault(model_for(teacher.cfg, request.kind), []).append(request)
    if len(by_model) > 1:  # a batch file names one model: one batch (or more) per teacher.models entry
        answers: dict[str, dict] = {}
        for group in by_model.values():
            answers |= await answer_uncached(teacher, group)
        return answers
    litellm = teacher._litellm
    (model,) = by_model or [teacher.cfg.model]
    name, provider, _, _ = litellm.get_llm_provider(model, api_base=teacher.cfg.api_base)  # name: without the prefix
    if provider not in PROVIDERS:
        raise ValueError(f"teacher.batch=true needs a provider whose batches litellm {version('litellm')} can "
                         f"create ({', '.join(PROVIDERS)}); {model!r} is served by {provider!r}: "
                         "set teacher.batch=false")
    pending: dict[str, dict] = {}  # cache key -> the batch line that asks for it
    for request in requests:
        key, params = teacher._keyed(request, 0)
        if key not in pending and teacher.cache.get(key) is None:
            pending[key] = {"custom_id": key, "method": "POST", "url": "/v1/chat/completions",
                            "body": {"model": name, "messages": list(request.messages), **params}}
    # The OpenAI SDK under litellm retries these calls on rate limits, 5xx and lost connections.
    api = {"custom_llm_provider": provider, "api_base": teacher.cfg.api_base, "api_key": teacher._api_key,
           "max_retries": teacher.cfg.max_retries}
    ledger = Ledger(teacher.cache.db)
    answers: dict[str, dict] = {}
    while pending:
        running = ledger.in_flight(set(pending))
        if not running:
            if teacher._over_budget():
                break
            lines = list(pending.values())
            for start in range(0, len(lines), teacher.cfg.batch_max_requests):
                chunk = lines[start:start + teacher.cfg.batch_max_requests]
                ledger.add(await _submit(litellm, teacher.cfg.batch_completion_window, chunk, api),
                           [line["custom_id"] for line in chunk])
            continue
        for batch_id, keys in running:
            batch = await _wait(litellm, batch_id, len(keys), teacher.cfg, api)
            if batch.status == "failed":
                ledger.close(batch_id, batch.status)
                raise BatchFailed(f"the provider failed batch {batch_id} of {len(keys)} {model} requests: "
                                  f"{_errors(batch)}; fix the cause and rerun (a new batch is submitted)")
            got = await _fetch(teacher, batch, model, api)
            for key, answer in got.items():
                teacher.cache.put(key, answer)
            answers |= got
            ledger.close(batch_id, batch.status)
            # An expired batch's unfinished requests go in the next batch; a completed one's
            # failures go online, where they are retried or reported like any failed call.
            done = keys if batch.status == "completed" else got
            missing = len(keys) - len(got)
            if missing:
                log.warning("batch %s %s with %d of %d requests unanswered: %s", batch_id, batch.status, missing,
                            len(keys), "asked online" if batch.status == "completed" else "sent again")
            for key in done:
                pending.pop(key, None)
    return answers


async def _submit(litellm, window: str, lines: list[dict], api: dict) -> str:
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = await litellm.acreate_file(file=("requests.jsonl", data, "application/jsonl"), purpose="batch", **api)
    batch = await litellm.acreate_batch(completion_window=window, endpoint="/v1/chat/completions",
                                        input_file_id=upload.id, **api)
    log.info("submitted batch %s: %d requests (%s window)", batch.id, len(lines), window)
    return batch.id


async def _wait(litellm, batch_id: str, total: int, cfg, api: dict):
    """The batch once it has ended, polled every `batch_poll_interval` seconds with a progress bar."""
    from tqdm import tqdm

    with tqdm(total=total, desc=f"batch {batch_id}", unit="req") as bar:
        while True:
            batch = await litellm.aretrieve_batch(batch_id=batch_id, **api)
            counts = batch.request_counts
            bar.update((counts.completed + counts.failed if counts else 0) - bar.n)
            if batch.status in ENDED:
                return batch
            await asyncio.sleep(cfg.batch_poll_interval)


async def _fetch(teacher: "Teacher", batch, model: str, api: dict) -> dict[str, dict]:
    """The batch's successful answers by cache key, accounted at the batch price."""
    if batch.output_file_id is None:
        return {}
    litellm = teacher._litellm
    content = await litellm.afile_content(file_id=batch.output_file_id, **api)
    priced = teacher.priced(model)
    answers = {}
    for line in content.content.decode().splitlines():
        row = json.loads(line)
        response = row.get("response") or {}
        if response.get("status_code") == 200:
            answers[row["custom_id"]] = _account(teacher, model, priced, response["body"], batch.id)
    return answers


def _account(teacher: "Teacher", model: str, priced: bool, body: dict, batch_id: str) -> dict:
    from litellm.cost_calculator import batch_cost_calculator
    from litellm.types.utils import Usage

    usage = Usage(**body["usage"])
    # The table's *_batches prices where it has them (OpenAI's), else half the list price.
    cost = sum(batch_cost_calculator(usage, model)) if priced else 0.0
    teacher.usage.unpriced_calls += not priced
    teacher.usage.calls += 1
    teacher.usage.prompt_tokens += usage.prompt_tokens
    teacher.usage.completion_tokens += usage.completion_tokens
    teacher.usage.cost_usd += cost
    return {"content": body["choices"][0]["message"]["content"], "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens, "cost_usd": cost, "batch": batch_id}


def _errors(batch) -> str:
    errors = getattr(batch.errors, "data", None) or []
    return "; ".join(f"{e.code}: {e.message}" for e in errors) or "no reason given"
