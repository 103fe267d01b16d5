"""The in-sandbox agent: the only program the sandbox starts. Standard library only.

It runs as `python -I -S agent.py PACKAGES_DIR WORKSPACE IN_FD OUT_FD` inside the sandbox,
reads one JSON request per line from IN_FD, runs the code in a namespace that persists
across requests (a session), and answers one JSON line on OUT_FD. Stdout and stderr (fds 1
and 2) are pipes the service reads itself, so output survives even if the code crashes the
interpreter; after each request the agent writes the request's marker to both, so the
service can tell where one request's output ends.

Per request it lowers its soft rlimits to the request's limits (the service set the hard
ones), kills every process the code left behind (it is a child subreaper, so even
double-forked daemons are its descendants), and reports the last expression's value, open
matplotlib figures as PNG, and the files the code wrote.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import ctypes
import fnmatch
import json
import os
import resource
import signal
import sys
import time
import traceback
from typing import Any

PR_SET_CHILD_SUBREAPER = 36
MAX_REPR_CHARS = 10_000
RESERVED_FDS = 16


def rlimits(limits: dict[str, int]) -> dict[int, int]:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return {
        # CPU seconds are cumulative per process: the budget starts from what is used.
        resource.RLIMIT_CPU: int(used.ru_utime + used.ru_stime + limits["cpu_time_ms"] / 1000) + 1,
        resource.RLIMIT_AS: limits["memory_mb"] * 1024 * 1024,
        resource.RLIMIT_NPROC: limits["max_processes"],
        resource.RLIMIT_FSIZE: limits["max_file_bytes"],
    }


def set_limits(limits: dict[str, int], hard_limits: dict[str, int]) -> None:
    """Hard limits only ever go down (the code cannot raise them back); soft ones are this
    request's. RLIMIT_CPU's hard limit stays: a session's CPU time adds up across calls."""
    hard_wanted = rlimits(hard_limits)
    for which, soft in rlimits(limits).items():
        _, hard = resource.getrlimit(which)
        if which != resource.RLIMIT_CPU:
            hard = (
                hard_wanted[which]
                if hard == resource.RLIM_INFINITY
                else min(hard, hard_wanted[which])
            )
        resource.setrlimit(
            which, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard)
        )
    # Keep a few descriptors back, so the agent can still report after the code used up all.
    _, hard_files = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard_files - RESERVED_FDS, hard_files))


def release_reserves() -> None:
    """After the code: memory and descriptors back to the hard limits, so reporting cannot
    fail where the code did."""
    for which in (resource.RLIMIT_AS, resource.RLIMIT_NOFILE):
        _, hard = resource.getrlimit(which)
        resource.setrlimit(which, (hard, hard))


def write_files(workspace: str, files: list[dict[str, Any]]) -> None:
    for item in files:
        path = os.path.join(workspace, item["path"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(item["content"]))
        if item.get("mode") is not None:
            os.chmod(path, item["mode"] & 0o777)


def snapshot(workspace: str) -> dict[str, tuple[float, int]]:
    seen = {}
    for root, _dirs, names in os.walk(workspace):
        for name in names:
            path = os.path.join(root, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            seen[os.path.relpath(path, workspace)] = (info.st_mtime, info.st_size)
    return seen


def collect_files(
    workspace: str, before: dict[str, tuple[float, int]], patterns: list[str], max_bytes: int
) -> list[dict[str, Any]]:
    """Regular files the request created or changed (or matching `patterns`), never
    following a symlink out of the workspace."""
    out = []
    budget = max_bytes
    for rel, stamp in sorted(snapshot(workspace).items()):
        wanted = (
            any(fnmatch.fnmatch(rel, p) for p in patterns) if patterns else before.get(rel) != stamp
        )
        if not wanted:
            continue
        path = os.path.join(workspace, rel)
        info = os.lstat(path)
        entry: dict[str, Any] = {
            "path": rel,
            "size": info.st_size,
            "content": "",
            "truncated": False,
            "omitted": False,
        }
        if not os.path.isfile(path) or os.path.islink(path):
            entry["omitted"] = True  # symlinks, sockets, fifos: never read
        elif budget <= 0:
            entry["omitted"] = True
        else:
            with open(path, "rb") as handle:
                data = handle.read(budget)
            entry["content"] = base64.b64encode(data).decode()
            entry["truncated"] = len(data) < info.st_size
            budget -= len(data)
        out.append(entry)
    return out


def figures(budget: int) -> list[dict[str, str]]:
    """Open matplotlib figures as PNG, while they fit in `budget` bytes."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return []
    import io

    outputs = []
    for number in plt.get_fignums():
        buffer = io.BytesIO()
        plt.figure(number).savefig(buffer, format="png")
        png = buffer.getvalue()
        if len(png) > budget:
            sys.stderr.write(f"figure {number} not returned: over the output size limit\n")
            continue
        budget -= len(png)
        outputs.append({"mime_type": "image/png", "data": base64.b64encode(png).decode()})
    plt.close("all")
    return outputs


def display(value: Any) -> list[dict[str, str]]:
    """The last expression's value, as a notebook shows it."""
    outputs = [
        {
            "mime_type": "text/plain",
            "data": base64.b64encode(repr(value)[:MAX_REPR_CHARS].encode()).decode(),
        }
    ]
    html = getattr(value, "_repr_html_", None)
    if callable(html):
        try:
            rendered = html()
        except Exception:
            rendered = None
        if isinstance(rendered, str):
            outputs.append(
                {
                    "mime_type": "text/html",
                    "data": base64.b64encode(rendered[: MAX_REPR_CHARS * 10].encode()).decode(),
                }
            )
    return outputs


def run_code(code: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """Exit code, error, rich outputs. A final expression is evaluated and displayed."""
    try:
        tree = ast.parse(code, "<code>", "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        assert last is None or isinstance(last, ast.Expr)
        exec(compile(tree, "<code>", "exec"), namespace)
        outputs = []
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<code>", "eval"), namespace)
            if value is not None:
                outputs = display(value)
        return {"exit_code": 0, "error": None, "outputs": outputs, "memory_exceeded": False}
    except SystemExit as exc:
        code_ = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return {"exit_code": code_, "error": None, "outputs": [], "memory_exceeded": False}
    except BaseException as exc:  # the code's own failure, reported like python would
        # Drop this module's own frame: the traceback starts in the caller's code.
        frames = exc.__traceback__.tb_next if exc.__traceback__ else None
        text = "".join(traceback.format_exception(type(exc), exc, frames))
        sys.stderr.write(text)
        error = {
            "type_name": type(exc).__name__,
            "message": str(exc)[:MAX_REPR_CHARS],
            "traceback": text[-MAX_REPR_CHARS:],
        }
        memory = isinstance(exc, MemoryError)  # numpy's allocation errors subclass it
        return {"exit_code": 1, "error": error, "outputs": [], "memory_exceeded": memory}


def descendants() -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found: set[int] = set()
    frontier = {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def kill_leftovers() -> None:
    """Kill whatever the code started, daemons included: as the child subreaper, every
    process the code created is our descendant. Repeated until none is left (a fork bomb
    keeps forking while we kill; RLIMIT_NPROC keeps that finite)."""
    while pids := descendants():
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    break
            except ChildProcessError:
                break


def cpu_ms() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return int((usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime) * 1000)


def main() -> None:
    packages, workspace = sys.argv[1], sys.argv[2]
    control_in_fd, control_out_fd = int(sys.argv[3]), int(sys.argv[4])
    if packages:
        sys.path.insert(0, packages)
    os.chdir(workspace)
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the size limit fail instead
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
    control_in = os.fdopen(control_in_fd, "rb", buffering=0)
    control_out = os.fdopen(control_out_fd, "wb", buffering=0)
    control_out.write(b'{"ready": true}\n')
    for line in control_in:
        request = json.loads(line)
        marker = request["marker"].encode()
        started, cpu_before = time.monotonic(), cpu_ms()
        write_files(workspace, request.get("files", []))
        before = snapshot(workspace)
        set_limits(request["limits"], request["hard_limits"])
        result = run_code(request["code"], namespace)
        sys.stdout.flush()
        sys.stderr.flush()
        release_reserves()
        kill_leftovers()
        try:
            result["outputs"] += figures(request["max_rich_output_bytes"])
        except Exception as exc:
            sys.stderr.write(f"could not render figures: {exc}\n")
        try:
            files = collect_files(
                workspace, before, request.get("output_paths", []), request["max_output_file_bytes"]
            )
        except OSError as exc:  # e.g. the code used up every file descriptor
            sys.stderr.write(f"could not collect written files: {exc}\n")
            files = []
        for fd in (1, 2):
            # If the code closed it, the service reads to the end of the stream instead.
            with contextlib.suppress(OSError):
                os.write(fd, marker)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        result.update(
            files=files,
            duration_ms=int((time.monotonic() - started) * 1000),
            cpu_time_ms=cpu_ms() - cpu_before,
            peak_memory_bytes=max(usage.ru_maxrss, children.ru_maxrss) * 1024,
        )
        control_out.write(json.dumps(result).encode() + b"\n")


if __name__ == "__main__":
    main()
