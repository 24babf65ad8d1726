"""What /proc says about a process: state, ids, parent and children, resident memory, open
descriptors, CPU time; a thread that samples memory; this test process's descriptor limit."""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from support.waiting import TIMEOUT


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat from the 3rd (state) on (the name may hold spaces)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def proc_state(pid: int) -> str | None:
    """The state letter of ``pid`` (R, S, Z...), or None once it is gone."""
    try:
        return _stat(pid)[0]
    except OSError:
        return None


def alive(pid: int) -> bool:
    """Running: not gone, not a zombie waiting for a parent to reap it."""
    return proc_state(pid) not in (None, "Z", "X")


def wait_gone(pids: Sequence[int], timeout: float = TIMEOUT) -> float:
    """Wait until none of ``pids`` runs; return the seconds it took."""
    start = time.monotonic()
    deadline = start + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"still running after {timeout:g}s: "
                               f"{[p for p in pids if alive(p)]}")
        time.sleep(0.02)
    return time.monotonic() - start


def status_field(pid: int, name: str) -> list[str]:
    """A field of /proc/PID/status, split on whitespace."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.split()
    raise KeyError(name)


def uids(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid."""
    return [int(v) for v in status_field(pid, "Uid")]


def gids(pid: int) -> list[int]:
    return [int(v) for v in status_field(pid, "Gid")]


def ppid(pid: int) -> int:
    return int(status_field(pid, "PPid")[0])


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (of any of its threads), sorted: a master's workers."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return sorted(out)


def process_family(pid: int) -> list[int]:
    """``pid`` and its live descendants (workers, should sniport fork any)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            todo += children(p)
    return out


def _vmrss(pid: int) -> int | None:
    try:
        return int(status_field(pid, "VmRSS")[0]) * 1024
    except KeyError:  # a zombie has no memory of its own
        return None


def rss(pid: int) -> int:
    """Resident memory of one process, in bytes."""
    value = _vmrss(pid)
    if value is None:
        raise LookupError("no VmRSS")
    return value


def family_rss(pid: int) -> int:
    """Resident memory of a process and its descendants (sniport and its workers)."""
    return sum(_vmrss(p) or 0 for p in process_family(pid))


def open_fds(pid: int) -> int:
    """How many descriptors a process and its descendants hold."""
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in process_family(pid))


def open_paths(pid: int) -> list[str]:
    """What the descriptors of ``pid`` point at (files show their current path)."""
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            out.append(os.readlink(fd))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and every live descendant (sniport's master forks its
    workers)."""
    total = 0
    for p in process_family(pid):
        with contextlib.suppress(OSError):
            fields = _stat(p)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples a process's resident memory every ``every`` seconds in a thread."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.pid = pid
        self.every = every
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(rss(self.pid))
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def raise_nofile(needed: int) -> None:
    """Raise this process's soft limit of open descriptors to ``needed`` (up to the hard
    limit), for tests that open many connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
