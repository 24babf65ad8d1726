"""sniport as a child process.

``start_sniport`` runs ``python -m sniport run -c FILE`` and waits for its "serving" line;
``Sniport`` is that process: a thread reads its stderr line by line (so that nothing it
writes can block it, and every line can be waited for), and ``stop()`` ends it and whatever
it started. ``run_cli`` runs the other commands (check, routes, status, reload...).

For the operations tests, ``Ops`` starts masters (``Master``: a ``Sniport`` with a state
directory, a pid file and a status file) in their own sessions and kills every process the
test started, workers and upgraded masters included, when the test ends.

Every process started here carries a tag in its environment (``ProcessTag``) that its
workers and any master it execs inherit, so that the end of a test finds them all, and
nothing else: pids are never killed by number alone on this shared machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from support.proc import alive
from support.waiting import TIMEOUT, wait_until

PYTHON = sys.executable
SNIPORT_BIN = str(Path(PYTHON).parent / "sniport")  # the installed console script
ROOT = Path(__file__).resolve().parents[2]  # the repository
SERVING = r"serving \S+ on ([^\n]+)"  # sniport's line once every listener is open


# --------------------------------------------------------------------------------------------
# Tagged processes


class ProcessTag:
    """An environment variable whose value is unique to one owner (a test, a sniport): the
    processes started with it, and everything they fork or exec, can be found in /proc."""

    VAR = "SNIPORT_TEST_TAG"

    def __init__(self) -> None:
        self.value = uuid.uuid4().hex
        self._entry = f"{self.VAR}={self.value}".encode()

    def environ(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """``env`` (default: this process's environment) with the tag."""
        full = dict(os.environ if env is None else env)
        full[self.VAR] = self.value
        return full

    def pids(self) -> list[int]:
        """Live processes that carry the tag."""
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if self._entry in environ.split(b"\0"):
                out.append(int(entry.name))
        return out

    def kill_all(self) -> None:
        """SIGKILL every running process with the tag, until none is left."""
        for _ in range(3):
            left = [p for p in self.pids() if alive(p)]
            if not left:
                return
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)


def spawn(argv: Sequence[str], *, cwd: Path, tag: ProcessTag,
          env: Mapping[str, str] | None = None,
          new_session: bool = False) -> subprocess.Popen[bytes]:
    """Start ``argv`` with the tag, stdin and stdout from/to /dev/null, stderr in a pipe."""
    return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=cwd, env=tag.environ(env),
                            start_new_session=new_session)


def run_command(config: Path, args: Sequence[str] = (), prefix: Sequence[str] = ()
                ) -> list[str]:
    """``[prefix...] python -m sniport run -c CONFIG [args...]``."""
    return [*prefix, PYTHON, "-m", "sniport", "run", "-c", str(config), *args]


def no_dac_override_prefix() -> list[str]:
    """As root, a server started under this prefix keeps uid 0 but loses the capabilities
    that bypass file permissions, so that a mode-000 file is unreadable to it as it would be
    to any unprivileged server. Empty when not root (permissions apply anyway)."""
    if os.geteuid() != 0:
        return []
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]


def run_cli(*args: str, cwd: Path | None = None,
            timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``python -m sniport ARGS...`` to its end: its exit code, stdout and stderr."""
    return subprocess.run([PYTHON, "-m", "sniport", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# A sniport process


class LogReader:
    """Reads a process's stderr on a thread, line by line, until EOF."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lines: list[str] = []
        self._partial = b""
        self._cond = threading.Condition()
        self.eof = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:
                chunk = b""
            with self._cond:
                if not chunk:
                    if self._partial:
                        self._lines.append(self._partial.decode(errors="replace"))
                    self.eof = True
                    self._cond.notify_all()
                    return
                data = self._partial + chunk
                *complete, self._partial = data.split(b"\n")
                self._lines.extend(c.decode(errors="replace") for c in complete)
                self._cond.notify_all()

    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def text(self) -> str:
        return "\n".join(self.lines())

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for line in self.lines() if rx.search(line))

    def wait(self, pattern: str, timeout: float = TIMEOUT, start: int = 0
             ) -> tuple[int, re.Match[str]]:
        """The first line at index >= ``start`` matching ``pattern``: (index, match)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self._lines):
                    m = rx.search(self._lines[i])
                    if m:
                        return i, m
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    break
                self._cond.wait(min(left, 0.2))
        raise TimeoutError(f"no log line matching {pattern!r} within {timeout:g}s "
                           f"(eof={self.eof}); log:\n{self.text()}")

    def wait_eof(self, timeout: float = TIMEOUT) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"stderr still open after {timeout:g}s")


class Sniport:
    """A ``sniport run`` process: its stderr (``stderr``, a LogReader; ``log()`` is its text
    so far) and, once it serves, its listening addresses."""

    def __init__(self, proc: subprocess.Popen[bytes], config: Path,
                 tag: ProcessTag | None = None) -> None:
        assert proc.stderr is not None, "sniport's stderr must be a pipe"
        self.proc = proc
        self.config = config
        self.tag = tag
        self.addresses: list[str] = []
        self.stderr = LogReader(proc.stderr.fileno())

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        """The port of the first TCP listener."""
        for a in self.addresses:
            if not a.startswith("unix:"):
                return int(a.rsplit(":", 1)[1])
        raise LookupError(f"no TCP listener in {self.addresses}")

    def listen_port(self, index: int) -> int:
        """The port of the ``index``-th listening address (listen entries, then
        http_listen)."""
        return int(self.addresses[index].rsplit(":", 1)[1])

    def log(self) -> str:
        return self.stderr.text()

    def wait_log(self, pattern: str, timeout: float = TIMEOUT, start: int = 0
                 ) -> re.Match[str]:
        """The first log line at index >= ``start`` (see ``mark``) matching ``pattern``."""
        return self.stderr.wait(pattern, timeout, start)[1]

    def mark(self) -> int:
        """The index of the next log line, to wait for lines after this point."""
        return len(self.stderr.lines())

    def wait_serving(self, timeout: float = TIMEOUT) -> None:
        """Until the "serving" line; its addresses become ``addresses``."""
        m = self.wait_log(SERVING, timeout)
        self.addresses = [a.strip() for a in m.group(1).split(",")]

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"sniport {self.pid} still running after {timeout:g}s; log:\n"
                               f"{self.log()}") from None

    def stop(self) -> int:
        """SIGTERM (SIGKILL after 10 s), then kill whatever it started that is left; its exit
        code. Stopping a stopped sniport does nothing."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.tag is not None:
            self.tag.kill_all()
        with contextlib.suppress(TimeoutError):
            self.stderr.wait_eof(5)
        return self.proc.returncode

    def __enter__(self) -> Sniport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_sniport(config_text: str, tmp: Path, *, name: str = "sniport.toml",
                  args: Sequence[str] = (), prefix: Sequence[str] = (),
                  env: Mapping[str, str] | None = None) -> Sniport:
    """Write ``config_text`` to ``tmp/name``, run sniport on it there and wait until it
    serves; ``prefix`` goes before the command (e.g. setpriv), ``env`` replaces the
    environment. Stop it with ``stop()`` or use it as a context manager."""
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / name
    config.write_text(config_text)
    tag = ProcessTag()
    s = Sniport(spawn(run_command(config, args, prefix), cwd=tmp, tag=tag, env=env), config,
                tag)
    try:
        s.wait_serving()
    except TimeoutError:
        s.stop()
        raise
    return s


class SniportWith(Protocol):
    """The ``sniport_with`` fixture: start_sniport in the test's tmp dir, stopped at the end
    of the test."""

    def __call__(self, config_text: str, *, name: str = ..., args: Sequence[str] = ...,
                 prefix: Sequence[str] = ..., env: Mapping[str, str] | None = ...
                 ) -> Sniport: ...


# --------------------------------------------------------------------------------------------
# The operations tests: masters in their own sessions, all killed at the end


class Master(Sniport):
    """A ``sniport run`` process (the master) started by ``Ops``."""

    def __init__(self, proc: subprocess.Popen[bytes], config: Path, state_dir: Path) -> None:
        super().__init__(proc, config)
        self.state_dir = state_dir

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "sniport.pid"

    @property
    def status_file(self) -> Path:
        return self.state_dir / "sniport.status.json"

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.status_file.read_text()))

    def workers(self) -> list[int]:
        return [int(p) for p in self.status()["workers"]]

    def names_itself(self) -> bool:
        """The status file exists and names this master."""
        try:
            return bool(self.status().get("pid") == self.pid)
        except (OSError, ValueError):
            return False

    def wait_generation(self, generation: int, timeout: float = TIMEOUT) -> list[int]:
        """Until the status file shows ``generation`` (it is written just after the
        "reloaded" line); its workers."""
        def shown() -> bool:
            try:
                return bool(self.status()["generation"] == generation)
            except (OSError, ValueError, KeyError):
                return False

        wait_until(shown, timeout, f"generation {generation} in {self.status_file}")
        return self.workers()

    def reload(self, *, via_cli: bool, ok: bool = True
               ) -> subprocess.CompletedProcess[str] | None:
        """SIGHUP, or ``sniport reload``, which waits for the verdict: exit 0 and
        "reloaded: generation N serving" (``ok``), or exit 1 and "reload failed: ..."."""
        if not via_cli:
            self.signal(signal.SIGHUP)
            return None
        r = run_cli("reload", "-c", str(self.config))
        if ok:
            assert r.returncode == 0, r.stdout + r.stderr
            assert re.fullmatch(r"reloaded: generation \d+ serving\n", r.stdout), r.stdout
        else:
            assert r.returncode == 1, r.stdout + r.stderr
            assert r.stderr.splitlines()[-1].startswith("error: reload failed: "), r.stderr
        return r

    def stop_cli(self, timeout: float = TIMEOUT) -> tuple[int, subprocess.CompletedProcess[str]]:
        """``sniport stop -c FILE`` while this test reaps the master (the CLI waits for the
        pid to disappear, and a child of ours stays a zombie until we wait for it)."""
        cli = subprocess.Popen([SNIPORT_BIN, "stop", "-c", str(self.config),
                                "--timeout", str(timeout)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            code = self.wait_exit(timeout)
            out, err = cli.communicate(timeout=timeout)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        return code, subprocess.CompletedProcess(cli.args, cli.returncode, out, err)


class Ops:
    """Starts sniport processes for one test (the ``ops`` fixture) and kills all of them at
    the end, passed or not: each runs in its own session, with the test's ProcessTag."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tag = ProcessTag()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pids: set[int] = set()  # worker and master pids seen, for the tests' records
        self.closers: list[Callable[[], None]] = []

    def __enter__(self) -> Ops:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:  # not reaped: its pid (and group id) are still ours
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        self.tag.kill_all()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for closer in self.closers:
            with contextlib.suppress(Exception):
                closer()

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        proc = spawn(argv, cwd=self.tmp, tag=self.tag, env=env, new_session=True)
        self.procs.append(proc)
        return proc

    def write_config(self, text: str, name: str = "sniport.toml") -> Path:
        path = self.tmp / name
        atomic_write(path, text)
        return path

    def start(self, config: Path, *, env: Mapping[str, str] | None = None,
              prefix: Sequence[str] = (), serving: bool = True,
              timeout: float = TIMEOUT) -> Master:
        """``python -m sniport run -c config``; with ``serving``, wait for the serving line
        and for the status file that names the master."""
        master = Master(self.spawn(run_command(config, prefix=prefix), env=env), config,
                        self.state_dir_of(config))
        if serving:
            master.wait_serving(timeout)
            # The pid and status files are written just after the serving line.
            wait_until(master.names_itself, timeout,
                       f"{master.status_file} naming the master {master.pid}")
            self.pids.update(master.workers())
        return master

    @staticmethod
    def state_dir_of(config: Path) -> Path:
        m = re.search(r'(?m)^state_dir = "([^"]*)"', config.read_text())
        assert m, "every ops config sets state_dir"
        return Path(m.group(1))

    def track_workers(self, master: Master) -> list[int]:
        pids = master.workers()
        self.pids.update(pids)
        return pids


def report(name: str, requests: int) -> None:
    """Every operations test says how many requests it sent (issue 5 asks for it)."""
    print(f"\n[ops] {name}: {requests} requests")
