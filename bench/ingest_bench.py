"""Ingestion through the real Airflow (api-server, scheduler, dag-processor and triggerer on
an embedded PostgreSQL, LocalExecutor) and the real embedding and retrieval services, in
one run:

1. Chunks/s end to end: the DAG `daert_ingest` triggered over the REST API v2 on a generated
   corpus of Markdown and text files, timed from the trigger to its last upsert (the end of
   the last ingest_batch task).
2. Raw embedding chunks/s of the same chunks (read back from the retrieval service) through
   the embedding service (4 concurrent callers, calls of 32 texts), and the ratio of the two.
3. An unchanged re-run on the same input, as a fraction of the first run's time.

Each run's task instances (queued, started, ended, relative to the run's queueing) show how
much of the time is Airflow scheduling versus work.

    make bench            # or: PYTHONPATH=. python bench/ingest_bench.py --documents 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
from daert.clients import EmbeddingClient, RetrievalClient
from daert.local.airflow import AirflowSettings, EmbeddedAirflow, create_database
from daert.local.child import free_port
from daert.local.postgres import EmbeddedPostgres
from daert.testing import ServerProcess
from daert.v1 import retrieval_pb2

DAG = "/api/v2/dags/daert_ingest"
COLLECTION = "bench"
PARAGRAPHS, SENTENCES = 12, 8

TEAMS = ["platform", "billing", "search", "storage", "security", "mobile", "data", "support"]
THINGS = ["cache", "queue", "index", "replica", "gateway", "scheduler", "ledger", "crawler"]
VERBS = ["recovered", "stalled", "was resized", "was rebuilt", "failed over", "was patched"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def corpus(folder: Path, documents: int) -> None:
    """`documents` files (every fourth plain text, the rest Markdown) of distinct sentences."""
    folder.mkdir(parents=True)
    for d in range(documents):
        lines = [] if d % 4 == 3 else [f"# Incident review {d}", ""]
        for p in range(PARAGRAPHS):
            if d % 4 != 3 and p % 4 == 0:
                lines += [f"## Part {p // 4 + 1} of review {d}", ""]
            sentences = []
            for s in range(SENTENCES):
                k = (d * PARAGRAPHS + p) * SENTENCES + s
                team, thing = TEAMS[k % len(TEAMS)], THINGS[(k // 8) % len(THINGS)]
                sentences.append(
                    f"In review {d} the {team} team saw the {thing} {k} "
                    f"{VERBS[(k // 64) % len(VERBS)]} after {k % 97 + 3} minutes, "
                    f"paragraph {p} sentence {s}."
                )
            lines += [" ".join(sentences), ""]
        suffix = ".txt" if d % 4 == 3 else ".md"
        (folder / f"review-{d:04d}{suffix}").write_text("\n".join(lines))


def trigger(api: httpx.Client, source: Path, timeout_s: float) -> tuple[float, str]:
    """Trigger a run, wait until it ends; (seconds from trigger to success, run id). The
    times are the run's own (queued at the trigger, ended), so the polling, kept slow to
    leave the api-server's CPU to the run, does not blur them."""
    reply = api.post(
        f"{DAG}/dagRuns",
        json={"logical_date": None, "conf": {"source": str(source), "collection": COLLECTION}},
    )
    reply.raise_for_status()
    run = reply.json()["dag_run_id"]
    deadline = time.monotonic() + timeout_s
    while (state := api.get(f"{DAG}/dagRuns/{run}").json()["state"]) not in ("success", "failed"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"run {run} still {state} after {timeout_s:g} s")
        time.sleep(2.0)
    if state != "success":
        tasks = [f"{t['task_id']}[{t['map_index']}]={t['state']}" for t in task_instances(api, run)]
        raise RuntimeError(f"run {run} failed: {', '.join(tasks)}")
    details = api.get(f"{DAG}/dagRuns/{run}").json()
    ended, queued = (datetime.fromisoformat(details[k]) for k in ("end_date", "queued_at"))
    return (ended - queued).total_seconds(), run


def task_instances(api: httpx.Client, run: str) -> list[dict[str, Any]]:
    reply = api.get(f"{DAG}/dagRuns/{run}/taskInstances", params={"limit": 100})
    reply.raise_for_status()
    return sorted(reply.json()["task_instances"], key=lambda t: t["start_date"] or "")


def summary(api: httpx.Client, run: str) -> dict[str, Any]:
    path = f"{DAG}/dagRuns/{run}/taskInstances/summarize/xcomEntries/return_value"
    return dict(api.get(path).json()["value"])


def last_upsert_s(api: httpx.Client, run: str) -> float:
    """Seconds from the trigger (the run's queueing) to the end of its last ingest_batch,
    which made the run's last upsert."""
    queued = datetime.fromisoformat(api.get(f"{DAG}/dagRuns/{run}").json()["queued_at"])
    ends = [t["end_date"] for t in task_instances(api, run) if t["task_id"] == "ingest_batch"]
    return max((datetime.fromisoformat(end) - queued).total_seconds() for end in ends)


def breakdown(api: httpx.Client, run: str, title: str) -> None:
    """Each task instance's queued/start/end (s after the run was queued) and duration, then
    how much of the run no task was running (scheduling, queueing, task process start)."""
    details = api.get(f"{DAG}/dagRuns/{run}").json()
    t0 = datetime.fromisoformat(details["queued_at"])
    wall = (datetime.fromisoformat(details["end_date"]) - t0).total_seconds()

    def at(stamp: str | None) -> float:
        return (datetime.fromisoformat(stamp) - t0).total_seconds() if stamp else float("nan")

    print(f"\n  {title}: task instances, seconds after the run was queued (run: {wall:.1f} s)")
    print(f"    {'task':<22} {'queued':>7} {'start':>7} {'end':>7} {'duration':>9}")
    spans, batches = [], []
    for t in task_instances(api, run):
        name = t["task_id"] + (f"[{t['map_index']}]" if t["map_index"] >= 0 else "")
        if t["start_date"] is None:  # a mapped task over no batch: skipped, never ran
            print(f"    {name:<22} {t['state']}")
            continue
        start, end = at(t["start_date"]), at(t["end_date"])
        spans.append((start, end))
        if t["task_id"] == "ingest_batch":
            batches.append((start, end))
        print(
            f"    {name:<22} {at(t['queued_when']):7.1f} {start:7.1f} {end:7.1f} "
            f"{t['duration'] or 0:9.1f}"
        )
    if batches:
        first, last = min(s for s, _ in batches), max(e for _, e in batches)
        print(
            f"    {len(batches)} ingest_batch tasks, first start to last end: {last - first:.1f} s"
        )
    busy, reach = 0.0, 0.0  # the union of the task intervals
    for start, end in sorted(spans):
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    print(
        f"    some task running {busy:.1f} s ({busy / wall:.0%}); no task running "
        f"{wall - busy:.1f} s ({(wall - busy) / wall:.0%}: scheduling, queueing, process starts)"
    )


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of process `pid`, or of the whole machine."""
    ticks = os.sysconf("SC_CLK_TCK")
    if pid is None:
        user, nice, system = Path("/proc/stat").read_text().split()[1:4]
        return (int(user) + int(nice) + int(system)) / ticks
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ticks


class CpuShare:
    """CPU seconds the embedding service used over a phase, next to the machine's."""

    def __init__(self, embedding_pid: int) -> None:
        self.pid = embedding_pid
        self.start = (cpu_seconds(self.pid), cpu_seconds())

    def line(self) -> str:
        service, machine = cpu_seconds(self.pid) - self.start[0], cpu_seconds() - self.start[1]
        return f"embedding service {service:6.1f} CPU s of the machine's {machine:6.1f}"


async def stored_texts(target: str) -> list[str]:
    """Every chunk text of the collection: ListDocuments page by page, Get per page."""
    texts, token = [], ""
    async with RetrievalClient(target, timeout_s=120) as client:
        while True:
            page = await client.stub.ListDocuments(
                retrieval_pb2.ListDocumentsRequest(
                    collection=COLLECTION, page_size=100, page_token=token
                )
            )
            ids = [d.document_id for d in page.documents]
            if ids:
                got = await client.stub.Get(
                    retrieval_pb2.GetRequest(collection=COLLECTION, document_ids=ids)
                )
                texts += [c.text for c in got.chunks]
            if not (token := page.next_page_token):
                return texts


# The embedding service's own rate on these chunks: as many callers as Airflow runs tasks, each
# sending calls of one model batch (the service's default max_batch_size).
RAW_CALLERS, RAW_CALL = 4, 32


async def embed_seconds(target: str, texts: list[str]) -> float:
    async with EmbeddingClient(target, timeout_s=600) as client:
        await client.embed_texts(texts[:8])  # a warm call, untimed
        calls = iter([texts[i : i + RAW_CALL] for i in range(0, len(texts), RAW_CALL)])

        async def caller() -> int:
            return sum([len(await client.embed_texts(call)) for call in calls])

        started = time.perf_counter()
        embedded = await asyncio.gather(*(caller() for _ in range(RAW_CALLERS)))
        seconds = time.perf_counter() - started
    assert sum(embedded) == len(texts)
    return seconds


def main(documents: int, run_timeout_s: float) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with ExitStack() as stack:
        state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ingest-bench-")))
        source = state / "documents"
        corpus(source, documents)
        log(f"corpus: {documents} files in {source}; starting PostgreSQL and the services")
        postgres = EmbeddedPostgres(state / "pgdata")
        dsn = postgres.start()
        stack.callback(postgres.stop)
        emb = stack.enter_context(ServerProcess("embedding"))
        ret = stack.enter_context(ServerProcess("retrieval", {"DAERT_RETRIEVAL_DSN": dsn}))
        for server in (emb, ret):
            server.wait_health("SERVING", 300)
        log("starting Airflow (migrations, four components; about a minute)")
        airflow = EmbeddedAirflow(
            AirflowSettings(port=free_port(), dags_folder=Path("dags")),
            state / "airflow",
            create_database(dsn),
            extra_env={"DAERT_EMBEDDING_TARGET": emb.target, "DAERT_RETRIEVAL_TARGET": ret.target},
        )
        stack.callback(airflow.stop)
        airflow.start()
        password = airflow.admin_password()
        api = stack.enter_context(httpx.Client(base_url=airflow.url, timeout=30))
        token = api.post("/auth/token", json={"username": "admin", "password": password})
        token.raise_for_status()
        api.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
        deadline = time.monotonic() + 180
        while api.get(DAG).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the DAG was never parsed; see {airflow.log_dir}")
            time.sleep(0.5)

        assert emb.process is not None
        log("first run: every document new")
        first_cpu = CpuShare(emb.process.pid)
        first_s, first_run = trigger(api, source, run_timeout_s)
        first_cpu_line = first_cpu.line()
        first = summary(api, first_run)
        log(f"  {first['summary']}")
        log("raw embedding of the stored chunks")
        texts = asyncio.run(stored_texts(ret.target))
        assert len(texts) == first["chunks_written"], (len(texts), first["chunks_written"])
        raw_cpu = CpuShare(emb.process.pid)
        raw_s = asyncio.run(embed_seconds(emb.target, texts))
        raw_cpu_line = raw_cpu.line()
        log("re-run: nothing changed")
        again_s, again_run = trigger(api, source, run_timeout_s)
        again = summary(api, again_run)
        log(f"  {again['summary']}")

        chunks = first["chunks_embedded"]
        upserted_s = last_upsert_s(api, first_run)
        ingest_rate, raw_rate = chunks / upserted_s, len(texts) / raw_s
        print(
            f"\ningestion DAG daert_ingest through Airflow {version('apache-airflow')} "
            f"(LocalExecutor, parallelism 4) and the embedding service ({os.cpu_count()} cores): "
            f"{first['seen']} documents, {chunks} chunks of <= 200 tokens"
        )
        print(
            f"  first run, trigger -> last upsert: {upserted_s:5.1f} s {ingest_rate:7.1f} chunks/s"
            f" (-> run success {first_s:.1f} s)"
        )
        print(
            f"  raw embedding of the same chunks: {raw_s:7.1f} s  {raw_rate:7.1f} chunks/s "
            f"({RAW_CALLERS} callers, {RAW_CALL} texts a call)"
        )
        print(f"  ingestion / raw embedding:        {ingest_rate / raw_rate:7.2f}    (goal >= 0.8)")
        print(
            f"  unchanged re-run:                 {again_s:7.1f} s  {again_s / first_s:7.1%} "
            f"of the first run   (goal <= 5 %)"
        )
        print(f"  re-run chunks embedded:           {again['chunks_embedded']:7d}    (must be 0)")
        print("  CPU, where the difference goes (Airflow, task processes, retrieval, PostgreSQL):")
        print(f"    first run:      {first_cpu_line}")
        print(f"    raw embedding:  {raw_cpu_line}")
        breakdown(api, first_run, "first run")
        breakdown(api, again_run, "re-run")
        log("stopping Airflow, the services and PostgreSQL")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=180, help="files in the corpus")
    parser.add_argument("--run-timeout", type=float, default=900, help="seconds per DAG run")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop every process
    main(args.documents, args.run_timeout)
