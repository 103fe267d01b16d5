"""Isolation drivers: the command line that starts the agent isolated.

Both run the agent under `prlimit` (hard rlimits the code cannot raise) and, when the service
runs as root, `setpriv` to a uid of the sandbox's own (so RLIMIT_NPROC counts only its
processes). `bubblewrap` adds new user, pid, net, ipc, uts and cgroup namespaces, no network,
a read-only minimal filesystem, private tmpfs /tmp and /workspace, an empty environment,
no capabilities, no nested user namespaces, `--new-session` and `--die-with-parent`.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from daert.sandbox.config import Limits, SandboxSettings

AGENT = Path(__file__).with_name("agent.py")
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "bpf", "perf_event_open",
    "userfaultfd", "keyctl", "add_key", "request_key", "kexec_load", "init_module",
    "finit_module", "delete_module", "mount", "umount2", "pivot_root", "unshare", "setns",
)  # fmt: skip
INSIDE_AGENT = "/opt/daert/agent.py"
INSIDE_PACKAGES = "/opt/daert/packages"
INSIDE_WORKSPACE = "/workspace"

# What the code sees as its environment: nothing of the service's.
SANDBOX_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": INSIDE_WORKSPACE,
    "LANG": "C.UTF-8",
    "MPLBACKEND": "Agg",
    "MPLCONFIGDIR": "/tmp",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    # One BLAS thread: each would reserve address space under RLIMIT_AS.
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]
    cwd: str | None


def _prlimit(limits: Limits) -> list[str]:
    prlimit = shutil.which("prlimit") or "prlimit"
    return [
        prlimit,
        f"--as={limits.memory_mb * 1024 * 1024}",
        f"--nproc={limits.max_processes}",
        f"--fsize={limits.max_file_bytes}",
        "--nofile=256",
        "--core=0",
        "--",
    ]


def _setpriv(uid: int | None) -> list[str]:
    if uid is None:
        return []
    setpriv = shutil.which("setpriv") or "setpriv"
    return [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]


def python_prefix(python: Path) -> str:
    """Where the interpreter's standard library lives (bound read-only into the sandbox)."""
    return str(Path(os.path.realpath(python)).parent.parent)


def seccomp_filter() -> bytes:
    """A BPF program that denies (EPERM) the system calls sandboxed code has no use for and
    that reach into other processes or the kernel: ptrace and friends, bpf, perf, keyrings."""
    import pyseccomp

    syscall_filter = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        syscall_filter.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
    with tempfile.TemporaryFile() as program:
        syscall_filter.export_bpf(program)
        program.seek(0)
        return program.read()


def agent_source() -> int:
    """A readable descriptor holding the agent's source, for bubblewrap to copy into the
    sandbox's own tmpfs: a bind mount of AGENT would name its host path (the service's
    install location) in the sandbox's /proc/self/mountinfo."""
    fd = os.memfd_create("daert-agent", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as handle:
            handle.write(AGENT.read_bytes())
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def bubblewrap(
    settings: SandboxSettings,
    limits: Limits,
    uid: int | None,
    fds: tuple[int, int],
    seccomp_fd: int,
    agent_fd: int,
) -> Launch:
    """`seccomp_fd` is a readable descriptor holding `seccomp_filter()`'s program, `agent_fd`
    one holding `agent_source()`.

    Nothing is bound from a path that names the service's checkout, venv or home: the agent
    is a copy in bwrap's tmpfs, the rest are system paths. Two sources stay visible in
    /proc/self/mountinfo, whose "root" field is a bind mount's source path within its
    filesystem and which no bind mount can change: the allowed packages' folder (bound at
    INSIDE_PACKAGES; hidden only on a filesystem of its own, e.g. a volume, as copying
    hundreds of MiB into every sandbox is no option) and an interpreter outside /usr (bound
    at its own path, which its standard library needs)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise FileNotFoundError("bwrap not found: install Debian's bubblewrap package")
    prefix = python_prefix(settings.python)
    argv = [
        *_prlimit(limits),
        *_setpriv(uid),
        bwrap,
        "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try", "--disable-userns",
        "--die-with-parent", "--new-session", "--cap-drop", "ALL",
        "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr",
        "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
        "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
    ]  # fmt: skip
    if not prefix.startswith("/usr/"):
        argv += ["--ro-bind", prefix, prefix]
    # fontconfig's configuration, for matplotlib's text rendering (present or not).
    argv += ["--ro-bind-try", "/etc/fonts", "/etc/fonts"]
    argv += ["--ro-bind-data", str(agent_fd), INSIDE_AGENT]
    if settings.packages_dir is not None:
        argv += ["--ro-bind", str(settings.packages_dir), INSIDE_PACKAGES]
    workspace_bytes = str(settings.workspace_mb * 1024 * 1024)
    argv += [
        "--proc", "/proc", "--dev", "/dev",
        "--size", workspace_bytes, "--tmpfs", "/tmp",
        "--size", workspace_bytes, "--tmpfs", INSIDE_WORKSPACE,
        "--chdir", INSIDE_WORKSPACE,
        # The root (bwrap's own tmpfs, unbounded) becomes read-only: only the sized tmpfs
        # /tmp and /workspace take writes.
        "--remount-ro", "/",
        "--seccomp", str(seccomp_fd),
        "--clearenv",
    ]  # fmt: skip
    for key, value in SANDBOX_ENV.items():
        argv += ["--setenv", key, value]
    packages = INSIDE_PACKAGES if settings.packages_dir is not None else ""
    argv += ["--", str(settings.python), "-I", "-S", INSIDE_AGENT, packages, INSIDE_WORKSPACE,
             str(fds[0]), str(fds[1])]  # fmt: skip
    return Launch(argv=argv, env={}, cwd=None)


def process(
    settings: SandboxSettings, limits: Limits, uid: int | None, fds: tuple[int, int], workdir: str
) -> Launch:
    """rlimits only: for a gVisor pod whose NetworkPolicy denies all egress."""
    packages = str(settings.packages_dir) if settings.packages_dir is not None else ""
    argv = [
        *_prlimit(limits),
        *_setpriv(uid),
        str(settings.python), "-I", "-S", str(AGENT), packages, workdir, str(fds[0]), str(fds[1]),
    ]  # fmt: skip
    return Launch(argv=argv, env={**SANDBOX_ENV, "HOME": workdir}, cwd=workdir)


def sandbox_uid(settings: SandboxSettings, slot: int) -> int | None:
    """A uid of the sandbox's own when we may switch to one (running as root)."""
    return settings.sandbox_uid_base + slot if os.geteuid() == 0 else None


def interpreter_exit_signal(driver: str, returncode: int) -> int:
    """The signal that ended the code: bubblewrap reports a child's death by signal N as exit
    status 128 + N; a plain process as a negative return code."""
    if returncode < 0:
        return -returncode
    if driver == "bubblewrap" and returncode > 128:
        return returncode - 128
    return 0
