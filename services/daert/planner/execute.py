"""Carrying out one planned task, by kind:

- llm: the generation service answers the instruction; the results it depends on go into
  its prompt, fitted to the model (calls.fit);
- search: hybrid search in the run's collection (the query embedded for the collection's
  dimensions), then rerank; the passages and their chunk ids are the result;
- code: the model writes a Python program, the sandbox service runs it (its limits apply);
  a failure goes back to the model to be fixed, at most `max_code_fixes` times; stdout, the
  last expression's value and the files written are the result;
- answer: like llm, composing the final answer to the objective.

`run` returns a JSON-serialisable result for XCom:
``{"id", "kind", "status": "done", "output": text, "sources": [...], "usage", "details",
"started", "ended" (epoch seconds), "duration_s"}``. A dependency without a result (it
failed, or was itself blocked) makes the task Blocked; a task that cannot be done raises
PlannerError, a service that is down ServiceUnavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from daert.clients import (
    EmbeddingClient,
    GenerationClient,
    RerankClient,
    RetrievalClient,
    SandboxClient,
)
from daert.planner.calls import (
    Usage,
    assistant,
    call,
    context_tokens,
    fit,
    generate,
    system,
    user,
)
from daert.planner.errors import PlannerError
from daert.planner.params import PlannerParams, parse_params
from daert.planner.plan import MARKER
from daert.v1 import common_pb2, embedding_pb2, rerank_pb2, retrieval_pb2, sandbox_pb2

Result = dict[str, Any]

ANSWER_MAX_TOKENS = 512
PROGRAM_MAX_TOKENS = 1024
SEARCH_TIMEOUT_S = 30.0
RERANK_TIMEOUT_S = 60.0
# The sandbox's own limits bound the run; this also covers queueing for a free sandbox.
SANDBOX_TIMEOUT_S = 180.0
SEARCH_CANDIDATES = 20
PASSAGES = 5
# Written files kept in the result as text, when they are text and this small.
FILE_TEXT_BYTES = 16 * 1024
ERROR_CHARS = 2000
FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)

TASK_PROMPT = (
    "You carry out one task of a plan toward this objective: {objective}\n"
    "The results of the tasks it depends on come first; then the task. Answer the task only, "
    "briefly. Passages are marked with their chunk ids in brackets; cite those you use."
)
ANSWER_PROMPT = (
    "Compose the final answer to this objective: {objective}\n"
    "The results of the plan's tasks come first. Answer from them only; cite the chunk ids "
    "(in brackets) of the passages you rely on."
)
CODE_PROMPT = (
    "Write a Python 3 program for the task below, toward this objective: {objective}\n"
    "The results of the tasks it depends on come first. The program must print its result. "
    "Reply with the program only, in one ```python block."
)
FIX_PROMPT = "The program failed:\n{error}\nReply with the whole corrected program only."


class Blocked(PlannerError):
    """A dependency has no result: this task is not run."""

    def __init__(self, task_id: str, missing: list[str]) -> None:
        super().__init__(f"task {task_id!r} not run: its dependencies {missing} have no result")
        self.missing = missing


def _cited(instruction: str, results: Mapping[str, Result]) -> str:
    """The instruction with each `$id` replaced by that result's output."""
    return MARKER.sub(lambda m: results[m[1]]["output"] if m[1] in results else m[0], instruction)


def _dependency_messages(results: Mapping[str, Result]) -> list[common_pb2.ChatMessage]:
    return [
        user(f"Result of task {task_id} ({r['kind']}):\n{r['output']}")
        for task_id, r in results.items()
    ]


def _inherited_sources(results: Mapping[str, Result]) -> list[dict[str, Any]]:
    """The dependencies, and the passages they drew on (each chunk once)."""
    sources: list[dict[str, Any]] = [{"task": task_id} for task_id in results]
    chunks: set[str] = set()
    for result in results.values():
        for source in result["sources"]:
            chunk = source.get("chunk_id")
            if chunk and chunk not in chunks:
                chunks.add(chunk)
                sources.append(source)
    return sources


async def _llm(
    params: PlannerParams, task: Mapping[str, Any], results: Mapping[str, Result]
) -> Result:
    prompt = ANSWER_PROMPT if task["kind"] == "answer" else TASK_PROMPT
    messages = [
        system(prompt.format(objective=params.objective)),
        *_dependency_messages(results),
        user(_cited(task["instruction"], results)),
    ]
    usage = Usage()
    async with GenerationClient() as client:
        budget = await context_tokens(client, params.model) - ANSWER_MAX_TOKENS
        fitted, how = await fit(messages, budget, params.tenant, usage, params.tokenizer)
        reply = await generate(
            client,
            f"task {task['id']!r}",
            fitted,
            model=params.model,
            tenant=params.tenant,
            max_tokens=ANSWER_MAX_TOKENS,
        )
    usage.add(reply.usage)
    return {
        "output": reply.text,
        "sources": _inherited_sources(results),
        "usage": usage.to_dict(),
        "details": {"model": reply.model, "fitted_by": how},
    }


async def _search(
    params: PlannerParams, task: Mapping[str, Any], results: Mapping[str, Result]
) -> Result:
    query = _cited(task["instruction"], results)
    async with (
        EmbeddingClient() as embedding,
        RetrievalClient() as retrieval,
        RerankClient() as rerank,
    ):
        described = await call(
            retrieval,
            f"describing collection {params.collection!r}",
            retrieval.stub.GetCollection(
                retrieval_pb2.GetCollectionRequest(
                    collection=params.collection, tenant=params.tenant
                ),
                timeout=SEARCH_TIMEOUT_S,
            ),
        )
        # The collection may hold fewer dimensions than the model gives (Matryoshka).
        [vector] = await call(
            embedding,
            "embedding the query",
            embedding.embed_texts(
                [query],
                input_type=embedding_pb2.INPUT_TYPE_QUERY,
                dimensions=described.collection.dimensions,
                timeout_s=SEARCH_TIMEOUT_S,
            ),
        )
        found = await call(
            retrieval,
            f"searching collection {params.collection!r}",
            retrieval.stub.Search(
                retrieval_pb2.SearchRequest(
                    collection=params.collection,
                    tenant=params.tenant,
                    query_text=query,
                    query_vector=common_pb2.Vector(values=vector),
                    top_k=SEARCH_CANDIDATES,
                    mode=retrieval_pb2.SEARCH_MODE_HYBRID,
                ),
                timeout=SEARCH_TIMEOUT_S,
            ),
        )
        hits = list(found.hits)
        ranked: list[tuple[retrieval_pb2.Chunk, float]] = []
        if hits:
            reply = await call(
                rerank,
                "reranking the passages",
                rerank.stub.Rerank(
                    rerank_pb2.RerankRequest(
                        query=query, documents=[h.chunk.text for h in hits], top_n=PASSAGES
                    ),
                    timeout=RERANK_TIMEOUT_S,
                ),
            )
            ranked = [(hits[r.index].chunk, r.score) for r in reply.results]
    passages = [
        {
            "chunk_id": chunk.id,
            "document_id": chunk.document_id,
            "source_uri": _text_field(chunk, "source_uri"),
            "title": _text_field(chunk, "title"),
            "score": round(score, 4),
            "text": chunk.text,
        }
        for chunk, score in ranked
    ]
    output = "\n".join(f"[{p['chunk_id']}] {p['text']}" for p in passages) or "(no passage found)"
    return {
        "output": output,
        "sources": [{k: v for k, v in p.items() if k != "text"} for p in passages],
        "usage": Usage().to_dict(),
        "details": {"query": query, "passages": passages},
    }


def _text_field(chunk: retrieval_pb2.Chunk, key: str) -> str:
    value = chunk.metadata.fields.get(key)
    return value.string_value if value is not None else ""


def program_of(reply: str) -> str:
    """The program in the model's reply: its ```python block, else the whole reply."""
    fenced = FENCE.search(reply)
    return (fenced[1] if fenced else reply).strip() + "\n"


def failure_of(reply: sandbox_pb2.ExecuteResponse) -> str:
    """Why a run failed, for the model to fix (empty: it did not)."""
    if reply.timed_out:
        return "it ran out of time (the sandbox's limit)"
    if reply.memory_exceeded:
        return "it ran out of memory (the sandbox's limit)"
    if reply.HasField("error"):
        error = reply.error
        return (error.traceback or f"{error.type_name}: {error.message}")[-ERROR_CHARS:]
    if reply.exit_code != 0 or reply.signal:
        return f"exit code {reply.exit_code}, signal {reply.signal}:\n{reply.stderr[-ERROR_CHARS:]}"
    return ""


def _files(reply: sandbox_pb2.ExecuteResponse) -> list[dict[str, Any]]:
    files = []
    for f in reply.files:
        entry: dict[str, Any] = {"path": f.path, "size": f.size, "mime_type": f.mime_type}
        if not f.truncated and not f.omitted and len(f.content) <= FILE_TEXT_BYTES:
            with contextlib.suppress(UnicodeDecodeError):
                entry["text"] = f.content.decode()
        files.append(entry)
    return files


async def _code(
    params: PlannerParams, task: Mapping[str, Any], results: Mapping[str, Result]
) -> Result:
    messages = [
        system(CODE_PROMPT.format(objective=params.objective)),
        *_dependency_messages(results),
        user(_cited(task["instruction"], results)),
    ]
    usage = Usage()
    attempts: list[dict[str, str]] = []
    async with GenerationClient() as generation, SandboxClient() as sandbox:
        budget = await context_tokens(generation, params.model) - PROGRAM_MAX_TOKENS
        messages, how = await fit(messages, budget, params.tenant, usage, params.tokenizer)
        for attempt in range(params.max_code_fixes + 1):
            reply = await generate(
                generation,
                f"task {task['id']!r}: writing the program (attempt {attempt + 1})",
                messages,
                model=params.model,
                tenant=params.tenant,
                max_tokens=PROGRAM_MAX_TOKENS,
            )
            usage.add(reply.usage)
            program = program_of(reply.text)
            ran = await call(
                sandbox,
                f"task {task['id']!r}: running the program",
                sandbox.stub.Execute(
                    sandbox_pb2.ExecuteRequest(code=program), timeout=SANDBOX_TIMEOUT_S
                ),
            )
            error = failure_of(ran)
            attempts.append({"program": program, "error": error})
            if not error:
                break
            messages += [assistant(reply.text), user(FIX_PROMPT.format(error=error))]
        else:
            raise PlannerError(
                f"task {task['id']!r}: the program still failed after {params.max_code_fixes} "
                f"fix(es): {attempts[-1]['error']}"
            )
    value = next((o.data.decode() for o in ran.outputs if o.mime_type == "text/plain"), "")
    return {
        "output": ran.stdout or value,
        "sources": _inherited_sources(results),
        "usage": usage.to_dict(),
        "details": {
            "program": program,
            "stdout": ran.stdout,
            "value": value,
            "files": _files(ran),
            "attempts": attempts,
            "fitted_by": how,
            "duration_ms": ran.duration_ms,
        },
    }


KIND_RUNNERS: dict[
    str,
    Callable[[PlannerParams, Mapping[str, Any], Mapping[str, Result]], Coroutine[Any, Any, Result]],
] = {
    "llm": _llm,
    "answer": _llm,
    "search": _search,
    "code": _code,
}


def run(
    params: PlannerParams | Mapping[str, Any],
    task: Mapping[str, Any],
    dependencies: Mapping[str, Result | None],
) -> Result:
    """Carry out `task` given its dependencies' results (None: that one has none)."""
    missing = sorted(d for d, r in dependencies.items() if r is None)
    if missing:
        raise Blocked(task["id"], missing)
    results = {d: r for d, r in dependencies.items() if r is not None}
    runner = KIND_RUNNERS.get(task["kind"])
    if runner is None:  # validation rejects unknown kinds; a stale XCom must not run either
        raise PlannerError(f"task {task['id']!r}: unknown kind {task['kind']!r}")
    started = time.time()
    result = asyncio.run(runner(parse_params(params), task, results))
    ended = time.time()
    return {
        "id": task["id"],
        "kind": task["kind"],
        "status": "done",
        **result,
        "started": started,
        "ended": ended,
        "duration_s": round(ended - started, 3),
    }
