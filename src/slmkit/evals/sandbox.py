"""Run untrusted generated code (HumanEval completions) in a separate, fenced-in process.

Never in our process: each program runs as `python -I` in a fresh temporary directory, in its
own process group, with a wall-clock timeout (the whole group is killed), an address-space cap
(a runaway allocation fails with MemoryError instead of taking the machine), a CPU-time cap, no
new processes beyond a handful, a file-size cap and an empty environment. Network: where the
kernel lets us (`unshare --net` as root or with user namespaces) the program gets a network
namespace with no interfaces; otherwise a prelude replaces the socket module's constructors so
that any connection attempt raises. That fallback stops accidents, not a determined attacker,
which is the same guarantee lm-evaluation-harness gives; run evaluations of untrusted models in
a container if that matters to you.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

MEMORY_LIMIT = 1 << 30  # bytes of address space
NO_NETWORK_PRELUDE = """\
import socket as _socket
def _refuse(*_a, **_k):
    raise OSError("network access is disabled in the evaluation sandbox")
_socket.socket = _refuse
_socket.create_connection = _refuse
_socket.getaddrinfo = _refuse
del _socket, _refuse
"""


@dataclass
class RunResult:
    passed: bool
    status: str  # "passed", "failed", "timeout", "memory"
    detail: str = ""


def _limits(memory: int, cpu_seconds: int) -> None:  # runs in the child before exec
    os.setsid()
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 24, 1 << 24))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@functools.lru_cache(maxsize=1)
def network_namespace_prefix() -> tuple[str, ...]:
    """`unshare` arguments that give a child no network, if this machine allows it; () otherwise."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for prefix in ((unshare, "--net"), (unshare, "--net", "--map-root-user")):
        try:
            probe = subprocess.run([*prefix, sys.executable, "-c", "pass"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def run_untrusted(program: str, timeout: float = 10.0, memory: int = MEMORY_LIMIT) -> RunResult:
    """Run `program` (Python source) fenced in; passed = it exited 0 within the limits."""
    with tempfile.TemporaryDirectory(prefix="slm-sandbox-") as folder:
        path = os.path.join(folder, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(NO_NETWORK_PRELUDE + "\n" + program)
        command = [*network_namespace_prefix(), sys.executable, "-I", path]
        proc = subprocess.Popen(command, cwd=folder, env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"},
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=lambda: _limits(memory, int(timeout) + 1))
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return RunResult(False, "timeout", f"killed after {timeout:.0f}s")
        text = err.decode(errors="replace")[-2000:]
        if proc.returncode == 0:
            return RunResult(True, "passed")
        if "MemoryError" in text:
            return RunResult(False, "memory", "exceeded the memory limit")
        if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return RunResult(False, "timeout", "exceeded the CPU-time limit")
        return RunResult(False, "failed", text.strip().splitlines()[-1] if text.strip() else f"exit {proc.returncode}")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()
