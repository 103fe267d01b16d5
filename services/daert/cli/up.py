"""`daert up` / `make up`: every service as its own local process, supervised.

Starts each service with its embedded defaults, waits until grpc.health.v1 says SERVING,
prints the endpoints and a first call to try, and on Ctrl-C or SIGTERM drains them all.
A service whose backends live outside the stack (generation: an LLM server such as Ollama)
is waited for only until it answers health; if it is NOT_SERVING, the banner says so and
its log says why. If one service dies, the others are stopped too: a half-running stack
only confuses. Data services the chosen services need and were not pointed at (an embedded
PostgreSQL for retrieval and the LoRA registry, or Weaviate; Redis for the generation cache,
the LoRA router and rolling summaries; the embedded LLM, llama.cpp's llama-server with
Gemma 3 270M, for generation and context) are started first, with their data under the
state folder, and stopped last. Airflow 3 (its four components, the DAGs in dags/, its
metadata in a database of its own on that PostgreSQL) starts while the services do. The
OpenAI-compatible gateway starts once they serve, with a development API key. The LLM,
Airflow and the gateway are watched like the services: if one dies, the stack stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daert.gateway.config import GatewaySettings
from daert.local.airflow import ADMIN_USER, AirflowSettings, EmbeddedAirflow, create_database
from daert.local.gateway import EmbeddedGateway
from daert.local.llm import EmbeddedLlm, LlmSettings, context_tokenizers, generation_models
from daert.local.postgres import EmbeddedPostgres
from daert.local.redis import EmbeddedRedis
from daert.local.weaviate import EmbeddedWeaviate
from daert.runtime.registry import load_spec
from daert.runtime.service import ServiceSpec
from daert.runtime.settings import ConfigError, ServerSettings, load_settings

# Where `make setup` links the grpcurl it builds.
LOCAL_GRPCURL = Path(".tools/bin/grpcurl")
# The ingestion DAG of dags/ingest_documents.py, named in the banner.
INGEST_DAG = "daert_ingest"


@dataclass
class _Running:
    spec: ServiceSpec[ServerSettings]
    settings: ServerSettings
    process: asyncio.subprocess.Process
    serving: bool = False

    @property
    def target(self) -> str:
        return f"localhost:{self.settings.port}"


def _say(message: str) -> None:
    print(f"[daert up] {message}", file=sys.stderr, flush=True)


async def _wait_serving(service: _Running, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with grpc.aio.insecure_channel(service.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if service.process.returncode is not None:
                raise RuntimeError(
                    f"{service.spec.name} exited with code {service.process.returncode}"
                )
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                service.serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                if service.serving:
                    return
                if service.spec.external_backends:
                    # Give its first readiness probe a moment, then go on without it.
                    await asyncio.sleep(1.0)
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    service.serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                    return
            if loop.time() > deadline:
                raise TimeoutError(f"{service.spec.name} not SERVING after {timeout_s:.0f}s")
            await asyncio.sleep(0.5)


class _Child(Protocol):
    """A supervised child that is not a gRPC service (the LLM, Airflow)."""

    def poll(self) -> int | None: ...

    def wait(self) -> int | None: ...


def _banner(services: list[_Running], data: _DataServices) -> str:
    lines = ["", "daert stack is up:", ""]
    if data.llm:
        llm = data.llm
        lines.append(f"  {'llm':<12} http {llm.url:<18} (llama.cpp server, OpenAI API at /v1)")
    if data.airflow:
        airflow = data.airflow
        lines.append(f"  {'airflow':<12} http {airflow.url:<18} (UI, REST API v2 at /api/v2)")
        lines.append(
            f"  {'':<12} log in as {ADMIN_USER} / {airflow.admin_password()} "
            f"(kept in {airflow.password_file})"
        )
    for s in services:
        metrics = (
            f"http://localhost:{s.settings.metrics_port}/metrics"
            if s.settings.metrics_port > 0
            else "off"
        )
        lines.append(f"  {s.spec.name:<12} grpc {s.target:<18} metrics {metrics}")
        if not s.serving:
            lines.append(
                f"  {'':<12} NOT_SERVING: waiting for its backend (its log above says why); "
                "it turns SERVING when the backend answers"
            )
    if data.gateway:
        lines.append(
            f"  {'gateway':<12} http {data.gateway.url:<18} (OpenAI API at /v1, docs at /docs)"
        )
        lines.append(
            f"  {'':<12} API key {data.gateway.dev_key()} (kept in {data.gateway.key_file})"
        )
    grpcurl = str(LOCAL_GRPCURL) if LOCAL_GRPCURL.exists() else "grpcurl"
    lines += ["", "Try:"]
    for s in services:
        if s.spec.example_method:
            lines.append(
                f"  {grpcurl} -plaintext -d '{s.spec.example_request}' {s.target} "
                f"{s.spec.example_method}"
            )
    if data.llm:
        lines.append(
            f"  curl -s {data.llm.url}/v1/chat/completions "
            "-H 'content-type: application/json' "
            """-d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}'"""
        )
    if data.gateway:
        lines += _gateway_examples(data.gateway, services)
    if data.airflow:
        lines.append(
            f"  drop documents into {data.documents_dir}, then trigger the DAG "
            f"{INGEST_DAG} at {data.airflow.url}/dags/{INGEST_DAG}"
        )
    lines += ["", "Ctrl-C stops everything.", ""]
    return "\n".join(lines)


def _gateway_examples(gateway: EmbeddedGateway, services: list[_Running]) -> list[str]:
    """A curl line and an openai-SDK snippet, ready to paste."""
    key, base = gateway.dev_key(), f"{gateway.url}/v1"
    model = os.environ.get("DAERT_GATEWAY_EXAMPLE_MODEL", "") or _default_model()
    return [
        f"  curl -s {base}/chat/completions -H 'authorization: Bearer {key}' "
        "-H 'content-type: application/json' "
        f"""-d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}'""",
        "  python - <<'EOF'",
        "  from openai import OpenAI",
        f'  client = OpenAI(base_url="{base}", api_key="{key}")',
        f'  reply = client.chat.completions.create(model="{model}", '
        'messages=[{"role": "user", "content": "Hello"}])',
        "  print(reply.choices[0].message.content)",
        "  EOF",
    ]


def _default_model() -> str:
    """The first configured generation model: the embedded LLM's unless overridden."""
    models = json.loads(os.environ.get("DAERT_GENERATION_MODELS") or "[]")
    return str(models[0]["name"]) if models else "llama3.2"


async def _unless_stopped(stop: asyncio.Event, work: Awaitable[object]) -> bool:
    """Await `work` unless Ctrl-C/SIGTERM comes first; True when `work` finished."""
    work_task = asyncio.ensure_future(work)
    stop_task = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({work_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    for task in (work_task, stop_task):
        task.cancel()
    if work_task in done:
        work_task.result()  # re-raise a failed start-up
        return True
    return False


async def _first_exit(services: list[_Running], watched: dict[str, _Child]) -> None:
    exits: set[asyncio.Future[int | None]] = {
        asyncio.ensure_future(s.process.wait()) for s in services
    }
    exits |= {asyncio.ensure_future(asyncio.to_thread(c.wait)) for c in watched.values()}
    await asyncio.wait(exits, return_when=asyncio.FIRST_COMPLETED)
    for task in exits:
        task.cancel()


async def _stop_all(services: list[_Running], grace_s: float) -> None:
    for s in services:
        if s.process.returncode is None:
            s.process.terminate()
    for s in services:
        try:
            await asyncio.wait_for(s.process.wait(), grace_s)
        except TimeoutError:
            _say(f"{s.spec.name} did not stop within {grace_s:.0f}s; killing it")
            s.process.kill()
            await s.process.wait()


# Services that keep data in PostgreSQL / Redis, found by their DSN / REDIS_URL settings.
_NEEDS_POSTGRES = ("retrieval", "lora")
_NEEDS_REDIS = ("generation", "lora", "context")
_NEEDS_LLM = ("generation", "context")


@dataclass
class _DataServices:
    stops: list[Callable[[], None]]
    watched: dict[str, _Child]  # children whose exit stops the stack
    postgres: EmbeddedPostgres | None = None
    llm: EmbeddedLlm | None = None
    airflow: EmbeddedAirflow | None = None
    gateway: EmbeddedGateway | None = None
    documents_dir: Path | None = None


def _start_llm(names: list[str], state_dir: Path, started: _DataServices) -> None:
    """The embedded LLM, unless it is off or generation is configured with other models."""
    settings = load_settings(LlmSettings)
    if not settings.enabled or not any(n in names for n in _NEEDS_LLM):
        return
    if os.environ.get("DAERT_GENERATION_MODELS"):
        _say("DAERT_GENERATION_MODELS is set: no embedded LLM (DAERT_LLM_ENABLED)")
        return
    llm = EmbeddedLlm(settings, state_dir / "llm")
    _say(f"starting the embedded LLM (llama-server on port {settings.port}; log {llm.log_file})")
    url = llm.start()
    started.stops.append(llm.stop)
    started.watched["llm"] = started.llm = llm
    per_request = settings.context_size // settings.parallel
    os.environ["DAERT_GENERATION_MODELS"] = generation_models(url, per_request)
    os.environ.setdefault("DAERT_CONTEXT_TOKENIZERS", context_tokenizers(url))
    _say(f"the embedded LLM is up at {url} ({settings.parallel} slots of {per_request} tokens)")


def _start_data_services(names: list[str], state_dir: Path, started: _DataServices) -> None:
    """Start what the services need and have no address for, recording in `started` how to
    stop each. The addresses go into this process's environment, which the services
    inherit."""
    stops = started.stops
    backend = os.environ.get("DAERT_RETRIEVAL_BACKEND", "pgvector")
    dsn_vars = [f"DAERT_{name.upper()}_DSN" for name in _NEEDS_POSTGRES if name in names]
    if "retrieval" in names and backend != "pgvector":
        dsn_vars.remove("DAERT_RETRIEVAL_DSN")
    if _wants_gateway(names):
        dsn_vars.append("DAERT_GATEWAY_DSN")
    unset = [var for var in dsn_vars if not os.environ.get(var)]
    airflow = load_settings(AirflowSettings)
    if unset or (airflow.enabled and not airflow.database_url):
        postgres = EmbeddedPostgres(state_dir / "pgdata")
        dsn = postgres.start()
        for var in unset:
            os.environ[var] = dsn
        stops.append(postgres.stop)
        started.postgres = postgres
        _say(f"started the embedded PostgreSQL + pgvector (data in {postgres.data_dir})")
    redis_vars = [f"DAERT_{name.upper()}_REDIS_URL" for name in _NEEDS_REDIS if name in names]
    if _wants_gateway(names):
        redis_vars.append("DAERT_GATEWAY_REDIS_URL")
    unset = [var for var in redis_vars if not os.environ.get(var)]
    if unset:
        redis = EmbeddedRedis(state_dir / "redis", persist=True)
        url = redis.start()
        for var in unset:
            os.environ[var] = url
        stops.append(redis.stop)
        _say(f"started Redis at {url} (snapshots in {redis.data_dir})")
    if (
        "retrieval" in names
        and backend == "weaviate"
        and not os.environ.get("DAERT_RETRIEVAL_WEAVIATE_URL")
    ):
        weaviate = EmbeddedWeaviate(state_dir / "weaviate")
        url, grpc_port = weaviate.start()
        os.environ["DAERT_RETRIEVAL_WEAVIATE_URL"] = url
        os.environ["DAERT_RETRIEVAL_WEAVIATE_GRPC_PORT"] = str(grpc_port)
        stops.append(weaviate.stop)
        _say(f"started the embedded Weaviate at {url} (data in {weaviate.data_dir})")
    _start_llm(names, state_dir, started)


def _wants_gateway(names: list[str]) -> bool:
    """The gateway runs unless DAERT_GATEWAY_ENABLED=false or the services it fronts for
    chat and embeddings are not all part of this stack."""
    enabled = os.environ.get("DAERT_GATEWAY_ENABLED", "true").lower() not in ("0", "false", "no")
    return enabled and "generation" in names and "embedding" in names


async def _start_gateway(services: list[_Running], data: _DataServices, state_dir: Path) -> None:
    for s in services:
        os.environ.setdefault(f"DAERT_{s.spec.name.upper()}_TARGET", s.target)
    gateway = EmbeddedGateway(load_settings(GatewaySettings), state_dir / "gateway")
    _say(f"starting the gateway at {gateway.url} (log {gateway.log_file})")
    data.stops.append(gateway.stop)
    await asyncio.to_thread(gateway.start)
    data.watched["gateway"] = data.gateway = gateway
    _say(f"the gateway is up at {gateway.url}")


def _airflow(data: _DataServices, state_dir: Path) -> EmbeddedAirflow | None:
    """Airflow, set up but not started (unless it is off): its metadata in its own database
    on the embedded PostgreSQL unless DAERT_AIRFLOW_DATABASE_URL names one."""
    settings = load_settings(AirflowSettings)
    if not settings.enabled:
        return None
    database_url = settings.database_url
    if not database_url:
        assert data.postgres is not None, "started for Airflow by _start_data_services"
        database_url = create_database(data.postgres.dsn)
    data.documents_dir = (state_dir / "documents").resolve()
    data.documents_dir.mkdir(parents=True, exist_ok=True)
    # The ingestion DAG's default source; its tasks find the services through the clients'
    # DAERT_<SERVICE>_TARGET, set when the DAG runs (`_start_airflow`).
    extra = {"DAERT_INGEST_SOURCE": os.environ.get("DAERT_INGEST_SOURCE", str(data.documents_dir))}
    return EmbeddedAirflow(settings, state_dir / "airflow", database_url, extra)


async def _start_airflow(
    airflow: EmbeddedAirflow, services: list[_Running], data: _DataServices
) -> None:
    for s in services:
        airflow.extra_env.setdefault(f"DAERT_{s.spec.name.upper()}_TARGET", s.target)
    _say(f"starting Airflow at {airflow.url} (logs in {airflow.log_dir})")
    data.stops.append(airflow.stop)
    await asyncio.to_thread(airflow.start)
    data.watched["airflow"] = data.airflow = airflow
    _say(f"Airflow is up at {airflow.url}")


async def _run(names: list[str], ready_timeout_s: float, state_dir: Path) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    services: list[_Running] = []
    data = _DataServices([], {})
    try:
        await asyncio.to_thread(_start_data_services, names, state_dir, data)
        airflow = _airflow(data, state_dir)
        for name in names:
            spec = load_spec(name)
            settings = load_settings(spec.settings)
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "daert", "serve", name
            )
            services.append(_Running(spec, settings, process))
            _say(f"started {name} (pid {process.pid}); waiting for it to be SERVING")
        waits = [_wait_serving(s, ready_timeout_s) for s in services]
        if airflow:
            waits.append(_start_airflow(airflow, services, data))
        if not await _unless_stopped(stop, asyncio.gather(*waits)):
            return 0
        if _wants_gateway(names) and not await _unless_stopped(
            stop, _start_gateway(services, data, state_dir)
        ):
            return 0
        print(_banner(services, data), flush=True)
        if not await _unless_stopped(stop, _first_exit(services, data.watched)):
            return 0
        dead = [s.spec.name for s in services if s.process.returncode is not None]
        dead += [name for name, child in data.watched.items() if child.poll() is not None]
        _say(f"{', '.join(dead)} exited; stopping the rest")
        return 1
    except (ConfigError, RuntimeError, TimeoutError) as exc:
        _say(f"error: {exc}")
        return 1
    finally:
        _say("stopping")
        grace = max((s.settings.grace_period_s for s in services), default=10.0) + 5
        await _stop_all(services, grace)
        for stop_data_service in reversed(data.stops):
            await asyncio.to_thread(stop_data_service)
        _say("stopped")


def run_stack(names: list[str], ready_timeout_s: float, state_dir: Path) -> int:
    return asyncio.run(_run(names, ready_timeout_s, state_dir))
