"""The teacher through litellm over HTTP, against the scripted local server."""

import hashlib
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from email.utils import formatdate

import pytest
from omegaconf import OmegaConf

from helpers import ROOT
from stat_exp.config import TeacherConfig
from stat_exp.pipeline import _teacher_identity
from stat_exp.skills import label_questions
from stat_exp.teacher.client import (BudgetExceeded, Reply, Request, Teacher, TeacherFailed, TeacherFatalError, Usage,
                                     _api_key, _cache_key, _cached_tokens, _key_variable, _retry_after, _short)
from stat_exp.teacher.parsers import ParseError
from teacher_server import Faults, TeacherServer

CATALOGUE = {"Algebra": ["linear_equations", "factoring", "quadratics"], "Geometry": ["triangles", "circles"]}


def questions(n: int) -> list[dict]:
    """Questions whose text names the skills the scripted teacher will answer with."""
    rows = []
    for i in range(n):
        subject = "Algebra" if i % 2 else "Geometry"
        skills = CATALOGUE[subject][: 1 + i % 2]
        rows.append({"id": f"q{i}", "subject": subject, "problem": f"Question {i} [needs: {', '.join(skills)}]",
                     "solution": f"Solution {i}. \\boxed{{{i}}}"})
    return rows


def labelling(content: str = "q", sample: int = 0) -> Request:
    """A skill-labelling request of one user message."""
    return Request("skill_labelling", ({"role": "user", "content": content},), sample=sample)


def labeller(body: dict) -> str:
    """Answers a labelling prompt with the skills named in its question."""
    prompt = body["messages"][-1]["content"]
    needs = re.search(r"\[needs: ([^\]]*)\]", prompt).group(1).split(", ")
    return "".join(f"<skill>{s}</skill>" for s in needs) + "<reason>named in the question</reason>"


@pytest.fixture(params=[True, False], ids=["openai-sdk", "litellm"])
def direct(request) -> bool:
    """Both call paths: OpenAI-compatible models through the openai SDK (the default), and through litellm."""
    return request.param


def teacher_config(server: TeacherServer, **overrides) -> TeacherConfig:
    base = OmegaConf.structured(TeacherConfig(name="local", model="openai/test-teacher", api_base=server.url,
                                              concurrency=16, backoff_initial=0.01, backoff_max=0.05, timeout=5))
    return OmegaConf.merge(base, overrides)


def test_labels_200_questions_then_a_rerun_makes_no_call(tmp_path):
    rows = questions(200)
    with TeacherServer(labeller) as server:
        teacher = Teacher(teacher_config(server), tmp_path)
        records = label_questions(teacher, rows, CATALOGUE, max_skills=5)
        assert server.requests == 200 and teacher.usage.calls == 200
        assert [r["skills"] for r in records][:4] == [["triangles"], ["linear_equations", "factoring"],
                                                       ["triangles"], ["linear_equations", "factoring"]]
        assert all(r["error"] is None for r in records)

        again = Teacher(teacher_config(server), tmp_path)  # a new run over the same cache
        assert label_questions(again, rows, CATALOGUE, max_skills=5) == records
        assert server.requests == 200 and again.usage.cache_hits == 200 and again.usage.calls == 0


def test_injected_rate_limits_errors_and_timeouts_still_answer_every_item(tmp_path, direct):
    rows = questions(60)
    faults = Faults(error_rate=0.14, hang_rate=0.06, hang_seconds=1.5, seed=1)
    with TeacherServer(labeller, faults) as server:
        teacher = Teacher(teacher_config(server, direct_openai=direct, timeout=0.5, max_retries=8), tmp_path)
        records = label_questions(teacher, rows, CATALOGUE, max_skills=5)
    assert all(r["skills"] and r["error"] is None for r in records)
    assert teacher.usage.retries >= 5 and teacher.usage.failed == 0
    # Each retry follows a fault the server injected, or a keep-alive connection it dropped while hanging.
    assert 60 < server.requests <= 60 + teacher.usage.retries


def test_malformed_answers_are_retried_then_recorded(tmp_path):
    def flaky(body: dict) -> str:
        prompt = body["messages"][-1]["content"]
        if "Question 0 " in prompt:
            return "I think it needs algebra."  # never parsable: no tags
        if "Question 1 " in prompt and body["temperature"] == 0:
            return "<skill>not_a_skill</skill>"  # only an unknown skill: parsed on the retry
        return labeller(body)

    with TeacherServer(flaky) as server:
        teacher = Teacher(teacher_config(server, parse_retries=2), tmp_path)
        records = label_questions(teacher, questions(4), CATALOGUE, max_skills=5)
    assert records[0]["skills"] == [] and records[0]["raw"] == "I think it needs algebra."
    assert "unparsable" in records[0]["error"]
    assert records[1]["skills"] == ["linear_equations", "factoring"] and records[1]["error"] is None
    assert teacher.usage.parse_failures == 3 + 1 and teacher.usage.unparsed == 1
    assert server.requests == 4 + 2 + 1


def test_budget_cap_stops_keeps_paid_answers_and_a_rerun_resumes(tmp_path, direct):
    rows = questions(40)
    with TeacherServer(labeller) as server:
        # A priced model name, so litellm's price table applies to the local server's answers.
        cfg = teacher_config(server, direct_openai=direct, model="openai/gpt-4o-mini", concurrency=1,
                             max_cost_usd=0.0001)
        teacher = Teacher(cfg, tmp_path)
        with pytest.raises(BudgetExceeded) as stopped:
            label_questions(teacher, rows, CATALOGUE, max_skills=5)
        paid = server.requests
        assert 0 < paid < 40 and teacher.usage.cost_usd >= 0.0001
        assert str(stopped.value) == (
            f"teacher budget of $0.0001 reached (${teacher.usage.cost_usd:.4f} spent): {paid} of 40 labelling skills "
            "requests answered and cached; raise teacher.max_cost_usd and rerun to resume without paying for them again")
        # One request at a time, so the run stops within one request's cost of the cap.
        costs = [json.loads(v)["cost_usd"] for (v,) in
                 sqlite3.connect(tmp_path / "teacher.sqlite").execute("SELECT value FROM answers")]
        assert len(costs) == paid and all(c > 0 for c in costs)
        assert sum(costs) - max(costs) < 0.0001 <= sum(costs) == pytest.approx(teacher.usage.cost_usd)

        cfg = teacher_config(server, direct_openai=direct, model="openai/gpt-4o-mini", concurrency=1)
        resumed = Teacher(cfg, tmp_path)
        records = label_questions(resumed, rows, CATALOGUE, max_skills=5)
        assert all(r["skills"] for r in records)
        assert resumed.usage.cache_hits == paid and server.requests == 40


def test_a_budget_spent_exactly_stops_the_next_request(tmp_path):
    requests = [labelling(sample=i) for i in range(2)]
    with TeacherServer(lambda body: "a") as server:
        priced = teacher_config(server, model="openai/gpt-4o-mini", concurrency=1)
        one = Teacher(priced, tmp_path / "one")
        one.ask(requests[:1], str)
        teacher = Teacher(OmegaConf.merge(priced, {"max_cost_usd": one.usage.cost_usd}), tmp_path / "two")
        with pytest.raises(BudgetExceeded, match="1 of 2 teacher requests answered"):
            teacher.ask(requests, str)
    assert server.requests == 2


def test_missing_key_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("STAT_NO_SUCH_KEY", raising=False)
    cfg = OmegaConf.structured(TeacherConfig(name="x", model="openai/gpt-4o-mini", api_key_env="STAT_NO_SUCH_KEY"))
    with pytest.raises(ValueError, match="STAT_NO_SUCH_KEY"):
        Teacher(cfg, tmp_path)


def test_each_prompt_kind_goes_to_its_model_priced_and_cached_under_it(tmp_path, direct):
    def answer(body: dict) -> str:
        return "two words"

    # 10 words of prompt, 2 of answer: the server counts tokens as words.
    prompt = ({"role": "user", "content": "one two three four five six seven eight nine ten"},)
    labelling = Request("skill_labelling", prompt)
    synthesis = Request("synthesis", prompt)
    with TeacherServer(answer) as server:
        cfg = teacher_config(server, direct_openai=direct, model="openai/gpt-4o-mini",
                             models={"synthesis": "openai/gpt-4o"})
        teacher = Teacher(cfg, tmp_path)
        teacher.ask([labelling, synthesis], lambda text: text)
        assert {b["model"]: b["max_tokens"] for b in server.bodies} == {"gpt-4o-mini": 512, "gpt-4o": 2048}
        # gpt-4o-mini: $0.15 and $0.60 per million tokens in and out; gpt-4o: $2.50 and $10.
        assert teacher.usage.cost_usd == pytest.approx(10 * 0.15e-6 + 2 * 0.6e-6 + 10 * 2.5e-6 + 2 * 10e-6)

        # Another synthesis model: only synthesis is asked again; labelling comes from the cache.
        cfg = teacher_config(server, direct_openai=direct, model="openai/gpt-4o-mini",
                             models={"synthesis": "openai/gpt-4.1"})
        again = Teacher(cfg, tmp_path)
        again.ask([labelling, synthesis], lambda text: text)
        assert again.usage.cache_hits == 1 and server.bodies[-1]["model"] == "gpt-4.1" and server.requests == 3


def test_a_plain_config_a_new_cache_folder_and_a_keyless_local_server(tmp_path, direct):
    """The dataclass works as well as its OmegaConf form; the cache folder is made with its parents;
    a local server without a key is sent vLLM's placeholder, and with neither api_base nor
    api_key_env the key is left to the provider's own variable."""
    with TeacherServer(lambda body: "fine") as server:
        cfg = TeacherConfig(name="local", model="openai/test-teacher", api_base=server.url, direct_openai=direct)
        teacher = Teacher(cfg, tmp_path / "new" / "cache")
        assert [r.parsed for r in teacher.ask([labelling("q")], str)] == ["fine"]
    assert server.api_keys == {"EMPTY"} and (tmp_path / "new" / "cache" / "teacher.sqlite").is_file()
    assert _api_key(TeacherConfig(name="x", model="openai/gpt-4o-mini")) is None


def test_a_misspelt_prompt_kind_in_models_is_named(tmp_path):
    cfg = OmegaConf.structured(TeacherConfig(name="x", model="openai/gpt-4o-mini",
                                             models={"synthesys": "openai/gpt-4o"}))
    with pytest.raises(ValueError, match=r"unknown prompt kinds \['synthesys'\]"):
        Teacher(cfg, tmp_path)


def test_stage_keys_follow_each_kinds_model():
    def identity(**models) -> dict:
        teacher = OmegaConf.structured(TeacherConfig(name="x", model="openai/gpt-4o-mini", models=models))
        return {kind: _teacher_identity(OmegaConf.create({"teacher": teacher}), (kind,))
                for kind in ("skill_labelling", "synthesis")}

    default, gpt4o = identity(), identity(synthesis="openai/gpt-4o")
    assert gpt4o["skill_labelling"] == default["skill_labelling"]
    assert gpt4o["synthesis"] != default["synthesis"]
    assert gpt4o["synthesis"]["kinds"]["synthesis"]["model"] == "openai/gpt-4o"


def test_a_rejected_key_is_sent_once_and_stops_the_run_naming_the_variable(tmp_path, monkeypatch, direct):
    monkeypatch.setenv("STAT_TEST_KEY", "sk-secret-test-key")
    with TeacherServer(labeller, Faults(error="key")) as server:
        cfg = teacher_config(server, direct_openai=direct, concurrency=1, max_retries=5, api_key_env="STAT_TEST_KEY")
        teacher = Teacher(cfg, tmp_path)
        with pytest.raises(TeacherFatalError, match=rf"^STAT_TEST_KEY was rejected \(401\) by the server at "
                           rf"teacher.api_base={re.escape(server.url)}: export a valid key, or choose "
                           r"teacher=local or teacher=oracle$") as caught:
            label_questions(teacher, questions(20), CATALOGUE, max_skills=5)
        assert server.requests == 1 and teacher.usage.retries == 0
        assert "sk-secret" not in str(caught.value)


def test_a_fatal_error_cancels_the_requests_in_flight_and_sends_no_more(tmp_path):
    with TeacherServer(labeller, Faults(error="key", latency=0.2)) as server:
        teacher = Teacher(teacher_config(server, concurrency=4), tmp_path)
        with pytest.raises(TeacherFatalError, match="teacher.api_key_env"):
            label_questions(teacher, questions(40), CATALOGUE, max_skills=5)
        time.sleep(0.3)  # anything still sending would arrive by now
        assert server.requests <= 4


# Each message whole, word for word ({where}: the server named; {error}: the server's own words).
@pytest.mark.parametrize("error, message", [
    ("permission", "{where} denied access to openai/test-teacher (403): check that the key's account may use it, "
                   "or choose another model (teacher.model, teacher.models.skill_labelling)"),
    ("model", "{where} does not know the model 'openai/test-teacher' (404): check teacher.model or "
              "teacher.models.skill_labelling and teacher.api_base (litellm names look like openai/gpt-4o-mini)"),
    ("bad_request", "{where} rejected a skill_labelling request to openai/test-teacher as invalid (400: {error}): "
                    "check teacher.sampling.skill_labelling and the model name"),
    ("context", "a skill_labelling prompt is longer than openai/test-teacher's context window: choose a model "
                "with a longer context for it (teacher.models.skill_labelling) or shorten the prompt"),
    ("key", "{where} asks for an API key (401): set teacher.api_key_env to the variable that holds it"),
], ids=["permission", "model", "bad_request", "context", "key"])
def test_errors_no_retry_fixes_stop_at_once(tmp_path, error, message, direct):
    with TeacherServer(labeller, Faults(error=error)) as server:
        teacher = Teacher(teacher_config(server, direct_openai=direct, concurrency=1), tmp_path)
        with pytest.raises(TeacherFatalError) as caught:
            label_questions(teacher, questions(5), CATALOGUE, max_skills=5)
        expected = message.format(where=f"the server at teacher.api_base={server.url}", error="ERROR")
        assert re.fullmatch(re.escape(expected).replace("ERROR", ".+"), str(caught.value))
        assert server.requests == 1


def provider_error(cls, status: int):
    import httpx

    response = httpx.Response(status, request=httpx.Request("POST", "https://api.openai.com/v1/chat/completions"))
    return cls("refused", response=response, body=None)


def test_errors_from_a_provider_without_api_base_name_the_provider_and_its_key(tmp_path, monkeypatch):
    import openai

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    import litellm

    teacher = Teacher(OmegaConf.structured(TeacherConfig(name="x", model="openai/gpt-4o-mini")), tmp_path)
    teacher._litellm = litellm  # set by ask(), which this test does not call
    model = "openai/gpt-4o-mini"
    assert teacher._unfixable(provider_error(openai.AuthenticationError, 401), model, "synthesis") == (
        "OPENAI_API_KEY was rejected (401) by the provider: export a valid key, or choose teacher=local or "
        "teacher=oracle")
    assert teacher._unfixable(provider_error(openai.PermissionDeniedError, 403), model, "synthesis") == (
        "the provider denied access to openai/gpt-4o-mini (403): check that the key's account may use it, or "
        "choose another model (teacher.model, teacher.models.synthesis)")
    assert teacher._unfixable(provider_error(openai.NotFoundError, 404), model, "synthesis") == (
        "the provider does not know the model 'openai/gpt-4o-mini' (404): check teacher.model or "
        "teacher.models.synthesis (litellm names look like openai/gpt-4o-mini)")
    # A server error, or a refused connection once the provider has answered, is retried.
    assert teacher._unfixable(provider_error(openai.InternalServerError, 500), model, "synthesis") is None
    teacher._answered = True
    refused = openai.APIConnectionError(request=provider_error(openai.NotFoundError, 404).request)
    refused.__cause__ = ConnectionRefusedError()
    assert teacher._unfixable(refused, model, "synthesis") is None
    teacher._answered = False
    assert teacher._unfixable(refused, model, "synthesis") == (
        "cannot reach openai/gpt-4o-mini (connection refused or unknown host): start the server there, or fix "
        "teacher.api_base")


def test_a_missing_openai_key_stops_before_any_request(tmp_path, monkeypatch, direct):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    teacher = Teacher(OmegaConf.structured(TeacherConfig(
        direct_openai=direct, name="x", model="openai/gpt-4o-mini")), tmp_path)
    with pytest.raises(TeacherFatalError, match=r"^OPENAI_API_KEY is not set: export it, or choose teacher=local "
                                                r"or teacher=oracle$"):
        label_questions(teacher, questions(3), CATALOGUE, max_skills=5)
    assert teacher.usage.retries == 0 and teacher.usage.calls == 0


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_api_base_stops_at_once(tmp_path, direct):
    url = f"http://127.0.0.1:{unused_port()}/v1"  # nothing listens there: connection refused
    cfg = OmegaConf.structured(TeacherConfig(
        direct_openai=direct, name="local", model="openai/x", api_base=url, backoff_initial=0.01))
    teacher = Teacher(cfg, tmp_path)
    with pytest.raises(TeacherFatalError, match=rf"^cannot reach {re.escape(url)} \(connection refused or unknown "
                                                r"host\): start the server there, or fix teacher.api_base$"):
        label_questions(teacher, questions(3), CATALOGUE, max_skills=5)
    assert teacher.usage.retries == 0


def test_a_refused_connection_after_the_server_answered_is_retried(tmp_path, direct):
    with TeacherServer(labeller) as server:
        teacher = Teacher(teacher_config(server, direct_openai=direct, max_retries=2), tmp_path)
        label_questions(teacher, questions(1), CATALOGUE, max_skills=5)
    # The server has gone (restarting, say): a transient failure, retried, not a mistake in the config.
    with pytest.raises(TeacherFailed, match="1 of 1 teacher requests"):
        label_questions(teacher, questions(2)[1:], CATALOGUE, max_skills=5)
    assert teacher.usage.retries == 2 and teacher.usage.failed == 1


@pytest.mark.parametrize("retry_after", ["1", "http-date"])
def test_rate_limits_wait_as_long_as_retry_after_says(tmp_path, retry_after, direct):
    if retry_after == "http-date":  # whole seconds only: 2 s from now is between 1 and 2 s after the 429
        retry_after = formatdate(time.time() + 2, usegmt=True)
    with TeacherServer(labeller, Faults(rate_limited=1, retry_after=retry_after)) as server:
        teacher = Teacher(teacher_config(server, direct_openai=direct, concurrency=1, backoff_initial=0.01), tmp_path)
        start = time.monotonic()
        records = label_questions(teacher, questions(1), CATALOGUE, max_skills=5)
        waited = time.monotonic() - start
    assert records[0]["error"] is None and server.requests == 2 and teacher.usage.retries == 1
    assert 0.95 <= waited < 3  # without the header: 0.01 s of backoff


@pytest.mark.parametrize("headers, seconds", [
    ({"retry-after-ms": "250", "retry-after": "1"}, 0.25),
    ({"retry-after": "3"}, 3.0),
    ({"retry-after": "0.5"}, 0.5),
    ({"retry-after": "-5"}, 0.0),
    ({"retry-after-ms": "-250"}, 0.0),
    ({"retry-after-ms": "later", "retry-after": "2"}, 2.0),  # an unreadable retry-after-ms: Retry-After
    ({"retry-after": formatdate(time.time() - 60, usegmt=True)}, 0.0),  # already past: go now
    ({"retry-after": "soon"}, None),  # unreadable: back off as usual
    ({}, None),
])
def test_retry_after_headers_are_read(headers, seconds):
    err = Exception()
    err.response = type("Response", (), {"headers": headers})()
    assert _retry_after(err) == seconds


def test_cached_prompt_tokens_are_counted_and_priced_at_the_cache_price(tmp_path, direct):
    def answer(body: dict) -> str:
        return "one"

    prompt = ({"role": "user", "content": " ".join(["word"] * 40)},)  # 40 prompt tokens, 1 completion token
    requests = [Request("skill_labelling", prompt, sample=i) for i in range(2)]
    with TeacherServer(answer) as server:
        server.cached_tokens = 32
        teacher = Teacher(teacher_config(server, direct_openai=direct, model="openai/gpt-4o-mini"), tmp_path)
        teacher.ask(requests, lambda text: text)
    # gpt-4o-mini: $0.15 per million input tokens, $0.075 cached, $0.60 output.
    assert teacher.usage.cached_prompt_tokens == 64 and teacher.usage.prompt_tokens == 80
    assert teacher.usage.completion_tokens == 2
    cost = 8 * 0.15e-6 + 32 * 0.075e-6 + 1 * 0.6e-6
    assert teacher.usage.cost_usd == pytest.approx(2 * cost)
    # Each cached answer keeps what it took and cost.
    rows = [json.loads(v) for (v,) in sqlite3.connect(tmp_path / "teacher.sqlite").execute("SELECT value FROM answers")]
    assert rows == [{"content": "one", "prompt_tokens": 40, "completion_tokens": 1, "cached_prompt_tokens": 32,
                     "cost_usd": pytest.approx(cost)}] * 2
    assert teacher.usage.cache_savings_usd == pytest.approx(2 * 32 * (0.15e-6 - 0.075e-6))
    # What the manifest and W&B get (dollars to the micro-dollar, as cost_usd).
    assert teacher.usage.as_dict() | {"cached_prompt_tokens": 64, "cache_savings_usd": 5e-6} == teacher.usage.as_dict()


def test_answers_without_usage_cost_nothing_at_a_priced_model(tmp_path, direct):
    """A server that reports no token usage: each call is counted, priced at zero tokens, not failed."""
    requests = [labelling("one two three", sample=i) for i in range(2)]
    with TeacherServer(lambda body: "four five") as server:
        server.usage = False
        teacher = Teacher(teacher_config(server, direct_openai=direct, model="openai/gpt-4o-mini"), tmp_path)
        replies = teacher.ask(requests, lambda text: text)
    assert [r.parsed for r in replies] == ["four five"] * 2
    assert teacher.usage.calls == 2 and teacher.usage.unpriced_calls == 0
    assert teacher.usage.cost_usd == 0.0 and teacher.usage.prompt_tokens == teacher.usage.completion_tokens == 0
    assert teacher.priced("openai/gpt-4o-mini") is True and teacher.priced("openai/test-teacher") is False


def test_cached_prompt_tokens_are_read_from_openais_field_or_anthropics():
    from types import SimpleNamespace as Usage_

    assert _cached_tokens(Usage_(prompt_tokens_details=Usage_(cached_tokens=5), cache_read_input_tokens=7)) == 5
    assert _cached_tokens(Usage_(prompt_tokens_details=None, cache_read_input_tokens=7)) == 7
    assert _cached_tokens(Usage_(prompt_tokens_details=Usage_(cached_tokens=None))) == 0
    assert _cached_tokens(None) == 0


def test_a_mismatched_number_of_parsers_is_named(tmp_path):
    with TeacherServer(labeller) as server:
        teacher = Teacher(teacher_config(server), tmp_path)
        with pytest.raises(ValueError, match="^2 parsers for 3 requests$"):
            teacher.ask([labelling(sample=i) for i in range(3)], [str, str])
    assert server.requests == 0


def test_replies_carry_their_request_answer_and_attempts(tmp_path, caplog, direct):
    def parse(text: str) -> str:
        if text.startswith("bad"):
            raise ParseError("no tags")
        return text.upper()

    def parse_nonempty(text: str) -> str:
        if not text:
            raise ParseError("empty")
        return text

    def answer(body: dict) -> str:
        question = body["messages"][-1]["content"]
        if question in ("empty", "blank"):
            return ""
        if question == "never" or question == "retried" and body["temperature"] == 0:
            return "bad answer"
        return f"ok {question}"

    requests = [labelling(q) for q in ("plain", "retried", "empty", "never", "blank")]
    caplog.set_level(logging.DEBUG, logger="stat_exp.teacher.client")
    with TeacherServer(answer) as server:
        teacher = Teacher(teacher_config(server, direct_openai=direct, parse_retries=1), tmp_path)
        replies = teacher.ask(requests, [parse] * 4 + [parse_nonempty])
    assert replies == [Reply(requests[0], "OK PLAIN", "ok plain", None, attempts=1),
                       Reply(requests[1], "OK RETRIED", "ok retried", None, attempts=2),
                       Reply(requests[2], "", "", None, attempts=1),
                       Reply(requests[3], None, "bad answer", "unparsable answer: no tags", attempts=2),
                       Reply(requests[4], None, "", "unparsable answer: empty", attempts=2)]
    assert teacher.usage.unparsed == 2 and sorted(teacher.unparsed_answers) == ["", "bad answer"]
    assert "skill_labelling attempt 0: no tags" in [r.getMessage() for r in caplog.records]


def test_a_changed_sampling_setting_asks_again(tmp_path):
    request = labelling()
    with TeacherServer(lambda body: "a") as server:
        for sampling in ({}, {"temperature": 0.7}, {"max_tokens": 100}, {}):
            teacher = Teacher(teacher_config(server, sampling={"skill_labelling": sampling}), tmp_path)
            assert teacher.ask([request], str)[0].parsed == "a"
    assert server.requests == 3 and [b["temperature"] for b in server.bodies] == [0.0, 0.7, 0.0]


def test_the_oracle_is_told_each_requests_prompt_kind(tmp_path):
    """Not left to guess it from a template's wording: a prompt in other words gets that kind's answer."""
    teacher = Teacher(OmegaConf.structured(TeacherConfig(name="oracle", model="oracle/skillworld")), tmp_path)
    messages = ({"role": "user", "content": "Which skills does 2 + 2 need?"},)
    [reply] = teacher.ask([Request("skill_labelling", messages)], str)
    assert reply.raw.startswith("I cannot answer this skill_labelling prompt")


def test_retries_back_off_exponentially_with_jitter(tmp_path):
    """Without a Retry-After: retry i waits backoff_initial * 2**i times a jitter in [0.5, 1)."""
    with TeacherServer(lambda body: "a", Faults(rate_limited=3)) as server:
        teacher = Teacher(teacher_config(server, max_retries=3, backoff_initial=0.3, backoff_max=10), tmp_path)
        assert teacher.ask([labelling()], str)[0].parsed == "a"
    gaps = [b - a for a, b in zip(server.arrivals, server.arrivals[1:])]
    assert len(gaps) == 3 and teacher.usage.retries == 3
    for i, gap in enumerate(gaps):
        assert 0.3 * 2**i * 0.5 <= gap < 0.3 * 2**i + 0.1, gaps  # 0.1 s for the request itself


def test_a_prompt_kind_without_sampling_is_named(tmp_path):
    with TeacherServer(labeller) as server:
        teacher = Teacher(teacher_config(server), tmp_path)
        with pytest.raises(KeyError, match="no teacher.sampling entry for prompt kind 'skill_labeling'"):
            teacher.ask([Request("skill_labeling", ({"role": "user", "content": "q"},))], str)


def test_a_call_slower_than_the_timeout_is_cut_and_fails(tmp_path, direct):
    import litellm  # noqa: F401  (imported before the clock starts: its import takes seconds)

    request = labelling()
    with TeacherServer(labeller, Faults(hang_rate=1.0, hang_seconds=3)) as server:
        teacher = Teacher(teacher_config(server, direct_openai=direct, timeout=0.3, max_retries=0, max_failed=1),
                          tmp_path)
        start = time.monotonic()
        [reply] = teacher.ask([request], str)
        assert time.monotonic() - start < 2.5
    assert reply == Reply(request, None, None, reply.error, attempts=1, failed=True) and "Timeout" in reply.error
    assert list(teacher.error_examples.values()) == [reply.error]
    assert teacher.usage.requests == teacher.usage.failed == 1


def test_a_stage_over_max_failed_names_the_count_the_kind_and_an_example(tmp_path, direct, caplog):
    def refuse(body: dict) -> tuple[int, str] | None:
        prompt = body["messages"][-1]["content"]
        failing = [n for n in ("3", "4") if f"Question {n} " in prompt]
        return (500, f"scripted error 500 on question {failing[0]}") if failing else None

    caplog.set_level(logging.DEBUG, logger="stat_exp.teacher.client")
    with TeacherServer(labeller, refuse=refuse) as server:
        teacher = Teacher(teacher_config(server, direct_openai=direct, max_retries=0), tmp_path)
        with pytest.raises(TeacherFailed) as failed:
            label_questions(teacher, questions(6), CATALOGUE, max_skills=5)
    example = teacher.error_examples["InternalServerError"]
    assert example.startswith("InternalServerError: ") and "scripted error 500" in example
    assert str(failed.value).startswith(f"2 of 6 teacher requests (labelling skills) failed after every retry: "
                                        f"2 x {example}. The 4 answered are cached")
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "stat_exp.teacher.client"]
    # Counted by kind, the first one's message the example: the two messages differ by the question.
    detail = example.removeprefix("InternalServerError: ")
    swap = {"question 3": "question 4", "question 4": "question 3"}
    other = re.sub(r"question [34]", lambda m: swap[m.group()], detail)
    assert other != detail and sorted(lines[:2]) == sorted(
        (logging.DEBUG, f"teacher request failed after 0 retries: {d}") for d in (detail, other))
    assert lines[2:] == [
        (logging.WARNING, f"labelling skills: 2 of 6 requests failed after every retry: 2 x {example}")]
    assert teacher.usage.failed == 2 and teacher.usage.errors == {"InternalServerError": 2}


def test_failures_of_several_kinds_are_warned_most_frequent_first(tmp_path, direct, caplog):
    def refuse(body: dict) -> int | None:
        prompt = body["messages"][-1]["content"]
        return 500 if "Question 1 " in prompt or "Question 2 " in prompt else 429 if "Question 3 " in prompt else None

    caplog.set_level(logging.WARNING, logger="stat_exp.teacher.client")
    with TeacherServer(labeller, refuse=refuse) as server:
        teacher = Teacher(teacher_config(server, direct_openai=direct, max_retries=0, max_failed=3), tmp_path)
        label_questions(teacher, questions(6), CATALOGUE, max_skills=5)
    examples = teacher.error_examples
    assert [r.getMessage() for r in caplog.records if r.name == "stat_exp.teacher.client"] == [
        f"labelling skills: 3 of 6 requests failed after every retry: 2 x {examples['InternalServerError']}; "
        f"1 x {examples['RateLimitError']}"]


def test_litellm_stays_quiet_its_banners_and_per_call_lines_off(tmp_path, capsys, caplog):
    import litellm  # noqa: F401  (what it logs while importing is not a call's)

    caplog.set_level(logging.DEBUG)  # as verbose as a user's own logging may be
    with TeacherServer(labeller, refuse=lambda body: 500 if "Question 1 " in body["messages"][-1]["content"] else None
                       ) as server:
        teacher = Teacher(teacher_config(server, direct_openai=False, max_retries=0, max_failed=1), tmp_path)
        label_questions(teacher, questions(2), CATALOGUE, max_skills=5)
    out = capsys.readouterr()
    assert "Give Feedback" not in out.out + out.err and "LiteLLM.Info" not in out.out + out.err
    assert [r for r in caplog.records if r.name.startswith("LiteLLM") and r.levelno < logging.WARNING] == []
    assert logging.getLogger().level == logging.DEBUG  # only litellm's logger is quieted


def test_a_model_missing_from_the_price_table_is_counted_unpriced_at_no_cost(tmp_path, direct):
    requests = [labelling(sample=i) for i in range(3)]
    with TeacherServer(lambda body: "a") as server:
        teacher = Teacher(teacher_config(server, direct_openai=direct), tmp_path)  # openai/test-teacher
        teacher.ask(requests, lambda text: text)
    assert teacher.usage.requests == teacher.usage.calls == teacher.usage.unpriced_calls == 3
    assert teacher.usage.cost_usd == 0.0
    assert teacher.usage.completion_tokens == 3


@pytest.fixture
def sdk_clients(monkeypatch) -> list:
    """Every openai.AsyncOpenAI client the teacher opens, in order."""
    import openai

    clients = []

    class RecordingClient(openai.AsyncOpenAI):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            clients.append(self)

    monkeypatch.setattr(openai, "AsyncOpenAI", RecordingClient)
    return clients


def test_the_sdk_path_opens_one_client_per_model_and_closes_it(tmp_path, sdk_clients):
    """One connection pool for all of an ask's calls to a model, closed when the ask ends."""
    requests = [labelling(sample=i) for i in range(4)]
    with TeacherServer(lambda body: "a") as server:
        teacher = Teacher(teacher_config(server, direct_openai=True, concurrency=1), tmp_path)
        assert [r.parsed for r in teacher.ask(requests, lambda text: text)] == ["a"] * 4
    assert len(sdk_clients) == 1 and sdk_clients[0].is_closed()


def test_only_models_litellm_sends_to_openai_take_the_sdk_path(tmp_path, sdk_clients):
    """Each prompt kind's own OpenAI model gets a client; another provider's model goes through litellm."""
    prompt = ({"role": "user", "content": "q"},)
    requests = [Request("skill_labelling", prompt), Request("synthesis", prompt)]
    with TeacherServer(lambda body: "a") as server:
        Teacher(teacher_config(server, models={"synthesis": "openai/other"}), tmp_path / "a").ask(requests, str)
        assert len(sdk_clients) == 2 and {b["model"] for b in server.bodies} == {"test-teacher", "other"}
        replies = Teacher(teacher_config(server, model="hosted_vllm/test-teacher"), tmp_path / "b").ask(requests, str)
        assert len(sdk_clients) == 2 and [r.parsed for r in replies] == ["a", "a"] and server.requests == 4


def test_a_bare_model_at_a_provider_litellm_knows_by_its_api_base_goes_through_litellm(tmp_path, monkeypatch,
                                                                                        sdk_clients):
    """litellm reads Groq from teacher.api_base: its model takes litellm's Groq route, not the OpenAI SDK."""
    import litellm

    groq = "https://api.groq.com/openai/v1"
    calls = []
    real = litellm.acompletion

    async def offline(**kwargs):  # litellm's own mock answer: nothing leaves this machine
        calls.append((kwargs["model"], kwargs["api_base"]))
        return await real(**kwargs, mock_response="a")

    monkeypatch.setattr(litellm, "acompletion", offline)
    cfg = OmegaConf.structured(TeacherConfig(name="groq", model="llama-3.1-8b-instant", api_base=groq, timeout=5))
    replies = Teacher(cfg, tmp_path).ask([labelling()], str)
    assert [r.parsed for r in replies] == ["a"] and calls == [("llama-3.1-8b-instant", groq)] and sdk_clients == []


def test_the_cli_prints_a_fatal_teacher_error_as_one_line(tmp_path):
    data = tmp_path / "data"
    (data / "math").mkdir(parents=True)
    rows = [{"problem": f"Problem {i}: solve x + {i} = {2 * i}.", "solution": f"\\boxed{{{i}}}", "type": "Algebra",
             "level": "Level 1"} for i in range(12)]
    (data / "math" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "skills.json").write_text(json.dumps(CATALOGUE))
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    with TeacherServer(labeller, Faults(error="model")) as server:
        out = subprocess.run(
            [sys.executable, "-m", "stat_exp", f"task.data_dir={data}", "task.val_size=4",
             "task.skills.catalogue_file=skills.json", "teacher=local", f"teacher.api_base={server.url}",
             "teacher.model=openai/no-such-model", "teacher.concurrency=1", "logger=none", "eval.benchmarks=[]",
             f"paths.cache_dir={tmp_path / 'cache'}",
             f"hydra.run.dir={tmp_path / 'run'}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: the server at teacher.api_base=")
    assert server.requests == 1


def test_failed_answers_are_not_cached_and_a_rerun_asks_them_again(tmp_path, direct):
    rows = questions(6)
    with TeacherServer(labeller, refuse=lambda body: 500 if "Question 3 " in body["messages"][-1]["content"] else None
                       ) as server:
        # the stage accepts it: the records show it
        cfg = teacher_config(server, direct_openai=direct, max_retries=1, max_failed=1)
        records = label_questions(Teacher(cfg, tmp_path), rows, CATALOGUE, max_skills=5)
        assert records[3]["skills"] == [] and "InternalServerError" in records[3]["error"]
        assert server.requests == 5 + 2  # question 3 was tried twice
        server.refuse = None  # the provider recovers
        again = Teacher(cfg, tmp_path)
        records = label_questions(again, rows, CATALOGUE, max_skills=5)
    assert records[3]["skills"] == ["linear_equations", "factoring"] and records[3]["error"] is None
    assert again.usage.cache_hits == 5 and again.usage.calls == 1 and server.requests == 8


def plain_requests(prefix: str, n: int) -> list[Request]:
    return [Request("diagnosis", ({"role": "user", "content": f"{prefix} {i}"},)) for i in range(n)]


def spaced_arrivals(server: TeacherServer, teacher: Teacher, *batches: int) -> list[float]:
    """Gaps between the server's arrivals of `batches` asked one ask() after another, after a warm-up
    call (litellm's first call blocks the event loop long enough for every start to fall due)."""
    teacher.ask(plain_requests("warm-up", 1), str)
    server.arrivals.clear()
    for i, n in enumerate(batches):
        teacher.ask(plain_requests(f"batch {i}", n), str)
    return [b - a for a, b in zip(server.arrivals, server.arrivals[1:])]


def test_requests_per_minute_spaces_request_starts(tmp_path):
    with TeacherServer(lambda body: "ok") as server:
        gaps = spaced_arrivals(server, Teacher(teacher_config(server, requests_per_minute=300), tmp_path), 6)
    # 300 a minute: one start every 0.2 s although 16 may be in flight; an arrival lags its start by a
    # varying few ms, so the typical gap and the whole span are checked, not each gap.
    assert len(gaps) == 5 and sorted(gaps)[2] > 0.15 and 0.8 < sum(gaps) < 3.0


def test_requests_per_minute_holds_across_ask_calls(tmp_path):
    with TeacherServer(lambda body: "ok") as server:
        gaps = spaced_arrivals(server, Teacher(teacher_config(server, requests_per_minute=60), tmp_path), 2, 2)
    assert min(gaps) > 0.7  # one start a second; the second batch's first request comes at once


def test_a_second_server_under_the_same_model_name_is_asked_not_answered_from_the_cache(tmp_path):
    rows = questions(1)  # a geometry question about triangles
    with TeacherServer(labeller) as first, TeacherServer(lambda body: "<skill>circles</skill>") as second:
        label_questions(Teacher(teacher_config(first), tmp_path), rows, CATALOGUE, max_skills=5)
        records = label_questions(Teacher(teacher_config(second), tmp_path), rows, CATALOGUE, max_skills=5)
    assert second.requests == 1 and records[0]["skills"] == ["circles"]


def test_cache_key_changes_with_everything_that_changes_the_answer():
    request = Request("diagnosis", ({"role": "user", "content": "q"},), sample=0)
    params = {"temperature": 0.0, "max_tokens": 16}
    base = dict(model="openai/m", request=request, params=params, attempt=0, api_base="http://a/v1")
    variants = [
        {"model": "openai/other"},
        {"api_base": "http://b/v1"},
        {"api_base": None},
        {"request": Request("diagnosis", ({"role": "user", "content": "q2"},), sample=0)},
        {"request": Request("diagnosis", ({"role": "system", "content": "q"},), sample=0)},
        {"request": Request("diagnosis", ({"role": "user", "content": "q"},), sample=1)},
        {"params": {"temperature": 0.7, "max_tokens": 16}},
        {"params": {"temperature": 0.0, "max_tokens": 32}},
        {"attempt": 1},
    ]
    keys = [_cache_key(**(base | change)) for change in [{}, *variants]]
    assert len(set(keys)) == len(keys)
    assert _cache_key(**base) == _cache_key(**base)  # and the same request gets the same key


def test_cache_keys_stay_what_earlier_versions_wrote():
    """The key is the SHA-256 of the request's canonical JSON (keys sorted): a cache of paid answers
    written by an earlier version is still found. Changing the format is a cache migration."""
    request = Request("diagnosis", ({"role": "user", "content": "q"},), sample=1)
    canonical = ('{"api_base": "http://a/v1", "attempt": 2, "messages": [{"content": "q", "role": "user"}], '
                 '"model": "openai/m", "params": {"max_tokens": 16, "temperature": 0.5}, "sample": 1}')
    key = _cache_key("openai/m", request, {"temperature": 0.5, "max_tokens": 16}, 2, api_base="http://a/v1")
    assert key == hashlib.sha256(canonical.encode()).hexdigest()


def test_both_call_paths_send_a_model_the_parameters_it_takes(tmp_path):
    """A reasoning model takes max_completion_tokens and no temperature: litellm's mapping, on either path."""
    request = labelling()
    bodies = {}
    for direct in (True, False):
        with TeacherServer(lambda body: "ok") as server:
            for model in ("openai/o3-mini", "openai/test-teacher"):
                teacher = Teacher(teacher_config(server, model=model, direct_openai=direct), tmp_path / f"{direct}")
                teacher.ask([request], str)
            bodies[direct] = [{k: v for k, v in b.items() if k != "messages"} for b in server.bodies]
    assert bodies[True] == bodies[False]
    reasoning, plain = bodies[True]
    assert reasoning["max_completion_tokens"] == 512 and not {"temperature", "max_tokens"} & set(reasoning)
    assert plain["max_tokens"] == 512 and plain["temperature"] == 0


def test_openai_compatible_models_skip_litellms_call(tmp_path, monkeypatch):
    import litellm

    async def refuse(**kwargs):
        raise AssertionError(f"litellm.acompletion called for {kwargs['model']}")

    monkeypatch.setattr(litellm, "acompletion", refuse)
    with TeacherServer(labeller) as server:
        records = label_questions(Teacher(teacher_config(server), tmp_path), questions(3), CATALOGUE, max_skills=5)
        assert [r["skills"] for r in records] == [["triangles"], ["linear_equations", "factoring"], ["triangles"]]
        with pytest.raises(AssertionError, match="litellm.acompletion called for openai/test-teacher"):
            label_questions(Teacher(teacher_config(server, direct_openai=False), tmp_path / "litellm"),
                            questions(1), CATALOGUE, max_skills=5)


@pytest.mark.parametrize("variables", [["OPENAI_BASE_URL"], ["OPENAI_API_BASE"], ["OPENAI_BASE_URL", "dead"]],
                         ids=["base_url", "api_base", "base_url-before-api_base"])
def test_an_openai_base_url_from_the_environment_is_followed_on_both_paths(tmp_path, monkeypatch, direct, variables):
    """litellm's order: OPENAI_BASE_URL, then OPENAI_API_BASE (here pointing nowhere when both are set)."""
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_BASE", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with TeacherServer(labeller) as server:
        monkeypatch.setenv(variables[0], server.url)
        if "dead" in variables:
            with socket.socket() as closed:  # a port nothing listens on
                closed.bind(("127.0.0.1", 0))
                monkeypatch.setenv("OPENAI_API_BASE", f"http://127.0.0.1:{closed.getsockname()[1]}/v1")
        cfg = OmegaConf.structured(TeacherConfig(name="x", model="openai/test-teacher", direct_openai=direct,
                                                 max_retries=0))
        records = label_questions(Teacher(cfg, tmp_path), questions(2), CATALOGUE, max_skills=5)
    assert server.requests == 2 and [r["skills"] for r in records] == [["triangles"], ["linear_equations", "factoring"]]


def test_usage_since_is_what_came_after_field_by_field():
    from dataclasses import fields

    names = [f.name for f in fields(Usage) if f.name != "errors"]
    before = Usage(**{name: i + 1 for i, name in enumerate(names)}, errors={"RateLimitError": 2, "Timeout": 1})
    after = Usage(**{name: 10 * (i + 1) for i, name in enumerate(names)},
                  errors={"RateLimitError": 5, "Timeout": 1, "APIConnectionError": 1})
    assert after.since(before) == Usage(**{name: 9 * (i + 1) for i, name in enumerate(names)},
                                        errors={"RateLimitError": 3, "APIConnectionError": 1})  # Timeout: none new


def test_a_usage_snapshot_does_not_follow_later_counts():
    usage = Usage(calls=2, cost_usd=0.5, errors={"Timeout": 1})
    snapshot = usage.snapshot()
    assert snapshot == usage
    usage.calls += 1
    usage.errors["Timeout"] += 1
    assert snapshot == Usage(calls=2, cost_usd=0.5, errors={"Timeout": 1})


def test_usage_as_dict_rounds_dollars_to_the_micro_dollar_and_keeps_the_rest():
    usage = Usage(calls=3, prompt_tokens=1234, cost_usd=0.12345678, cache_savings_usd=0.98765432, errors={"Timeout": 1})
    assert usage.as_dict() == {**vars(usage), "cost_usd": 0.123457, "cache_savings_usd": 0.987654}


def test_the_failure_report_gives_counts_kinds_and_how_to_resume(tmp_path):
    teacher = Teacher(OmegaConf.structured(TeacherConfig(name="x", model="openai/gpt-4o-mini", max_failed=1)), tmp_path)
    teacher.error_examples = {"RateLimitError": "RateLimitError: slow down"}  # Timeout: no example, its kind shown
    # Most frequent first, which is neither the kinds' given order nor their alphabetical one.
    assert teacher.failure_report(3, 10, {"RateLimitError": 1, "Timeout": 2}, "labelling") == (
        "3 of 10 teacher requests (labelling) failed after every retry: 2 x Timeout; 1 x RateLimitError: slow down. "
        "The 7 answered are cached, so a rerun asks only for the failed ones; nothing was stored for this stage "
        "(teacher.max_failed=1 accepts that many)")


@pytest.mark.parametrize("key, text, scrubbed", [
    ("sk-secret-123", "invalid key sk-secret-123 (sk-secret-123)", "invalid key *** (***)"),
    ("abcd", "abcd: 4 characters, too short to tell from words", "abcd: 4 characters, too short to tell from words"),
    ("abcde", "abcde: 5 characters, scrubbed", "***: 5 characters, scrubbed"),
])
def test_a_key_a_provider_echoes_is_scrubbed(tmp_path, monkeypatch, key, text, scrubbed):
    monkeypatch.setenv("STAT_TEST_KEY", key)
    cfg = OmegaConf.structured(TeacherConfig(name="x", model="openai/gpt-4o-mini", api_key_env="STAT_TEST_KEY"))
    assert Teacher(cfg, tmp_path)._scrub(text) == scrubbed
    keyless = OmegaConf.structured(TeacherConfig(name="x", model="openai/gpt-4o-mini"))
    assert Teacher(keyless, tmp_path / "keyless")._scrub(text) == text


@pytest.mark.parametrize("model, variable", [
    ("anthropic/claude-sonnet-4-5", "ANTHROPIC_API_KEY"),
    ("openai/gpt-4o-mini", "OPENAI_API_KEY"),
    ("mistral/mistral-large-latest", "MISTRAL_API_KEY"),
])
def test_the_key_variable_is_the_one_litellm_reads(monkeypatch, model, variable):
    import litellm

    for name in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "MISTRAL_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert _key_variable(litellm, model) == variable  # missing: litellm names it
    monkeypatch.setenv(variable, "set")
    assert _key_variable(litellm, model) == variable  # set (and rejected): named from the provider


def test_a_provider_whose_key_is_not_named_for_it_gets_litellms_name(monkeypatch):
    import litellm

    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    assert _key_variable(litellm, "bedrock/anthropic.claude-3-sonnet-20240229-v1:0") == "AWS_ACCESS_KEY_ID"


def test_an_error_is_shown_by_its_first_line_cut_to_200_characters():
    assert _short(ValueError("first line\nsecond line")) == "first line"
    assert _short(ValueError("x" * 250)) == "x" * 200
    assert _short(ValueError()) == "ValueError"
