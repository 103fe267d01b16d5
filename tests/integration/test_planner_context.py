"""An `llm` task's prompt fitted through the real context service (DAERT_CONTEXT_TARGET set):
a dependency result far over the model's budget is condensed so that what the model gets
fits the budget as the context service counts it, and still holds the dependency's key
fact. The task runs through execute.run (no Airflow) against real generation (in front of
the fake OpenAI-compatible server, which records the request), context (the "tiny"
tokenizer; no generation behind it, so AUTO condenses extractively) and embedding servers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from daert.clients import ContextClient
from daert.planner import execute
from daert.planner.errors import PlannerError, ServiceUnavailable
from daert.testing import ServerProcess
from daert.v1 import common_pb2, context_pb2

from tests.fakes.openai import FakeOpenAI

MODEL = "planner-small"
# ListModels' context length; the planner leaves ANSWER_MAX_TOKENS of it to the answer.
CONTEXT_LENGTH = 1024
BUDGET = CONTEXT_LENGTH - execute.ANSWER_MAX_TOKENS
FACT = "The Helix-9 coolant pump is inspected every 400 operating hours."
ROLES = {"system": common_pb2.ROLE_SYSTEM, "user": common_pb2.ROLE_USER}


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(models=["fake/planner"], max_model_len=CONTEXT_LENGTH) as fake:
        fake.reply_fn = lambda prompt: ["Noted: every 400 hours."]
        yield fake


@pytest.fixture(scope="module")
def generation_server(fake_llm: FakeOpenAI) -> Iterator[ServerProcess]:
    models = [
        {
            "name": MODEL,
            "backend": "openai",
            "url": fake_llm.url,
            "upstream_model": "fake/planner",
            "context_length": CONTEXT_LENGTH,
        }
    ]
    env = {"DAERT_GENERATION_MODELS": json.dumps(models), "DAERT_GENERATION_RETRY_ATTEMPTS": "1"}
    with ServerProcess("generation", env) as server:
        server.wait_health("SERVING")
        yield server


def _messages(request: dict[str, Any]) -> list[common_pb2.ChatMessage]:
    return [
        common_pb2.ChatMessage(role=ROLES[m["role"]], content=m["content"])
        for m in request["messages"]
    ]


async def _count(target: str, messages: list[common_pb2.ChatMessage]) -> int:
    async with ContextClient(target, timeout_s=60) as context:
        reply = await context.stub.CountTokens(
            context_pb2.CountTokensRequest(messages=messages, tokenizer="tiny")
        )
    return int(reply.tokens)


def test_a_dependency_far_over_the_budget_is_fitted_by_the_context_service_keeping_its_fact(
    monkeypatch: pytest.MonkeyPatch,
    fake_llm: FakeOpenAI,
    generation_server: ServerProcess,
    rag_context_server: ServerProcess,
) -> None:
    import asyncio

    monkeypatch.setenv("DAERT_GENERATION_TARGET", generation_server.target)
    monkeypatch.setenv("DAERT_CONTEXT_TARGET", rag_context_server.target)
    # Bland, repetitive maintenance prose around one distinctive fact.
    filler = [
        f"Section {i} of the manual covers routine housekeeping of the plant and is "
        "otherwise unremarkable for the crew."
        for i in range(60)
    ]
    output = " ".join([*filler[:30], FACT, *filler[30:]])
    found = {"id": "find", "kind": "search", "output": output, "sources": []}
    task = {
        "id": "explain",
        "kind": "llm",
        "instruction": "How often is the pump inspected?",
        "depends_on": ["find"],
        "references": [],
    }
    params = {"objective": "Pump inspections", "model": MODEL, "tokenizer": "tiny"}

    result = execute.run(params, task, {"find": found})

    assert result["status"] == "done" and result["output"] == "Noted: every 400 hours."
    assert result["details"]["fitted_by"] == "context service"
    sent = _messages(fake_llm.requests_to("/v1/chat/completions")[-1].json)
    unfitted = [
        execute.system(execute.TASK_PROMPT.format(objective=params["objective"])),
        *execute._dependency_messages({"find": found}),
        execute.user(task["instruction"]),
    ]
    before = asyncio.run(_count(rag_context_server.target, unfitted))
    after = asyncio.run(_count(rag_context_server.target, sent))
    assert before > 3 * BUDGET, before  # far over the budget ...
    assert after <= BUDGET, (after, BUDGET)  # ... and what the model got is within it
    prompt = "\n".join(m.content for m in sent)
    assert "400 operating hours" in prompt, prompt
    # The task's system prompt and its instruction reached the model whole; between them the
    # dependency condensed into one system message (the extractive summary).
    assert len(sent) == 3 and sent[1].role == common_pb2.ROLE_SYSTEM
    assert sent[0].content == unfitted[0].content
    assert sent[-1].content == "How often is the pump inspected?"


def test_the_tokenizer_param_names_what_the_context_service_counts_with(
    monkeypatch: pytest.MonkeyPatch,
    generation_server: ServerProcess,
    rag_context_server: ServerProcess,
) -> None:
    monkeypatch.setenv("DAERT_GENERATION_TARGET", generation_server.target)
    monkeypatch.setenv("DAERT_CONTEXT_TARGET", rag_context_server.target)
    task = {"id": "t", "kind": "llm", "instruction": "Go", "depends_on": [], "references": []}
    params = {"objective": "x", "model": MODEL, "tokenizer": "no-such-tokenizer"}
    # Not worth a retry: a PlannerError, not ServiceUnavailable, naming the tokenizer.
    with pytest.raises(PlannerError, match=r"NOT_FOUND.*'no-such-tokenizer'") as raised:
        execute.run(params, task, {})
    assert not isinstance(raised.value, ServiceUnavailable)
