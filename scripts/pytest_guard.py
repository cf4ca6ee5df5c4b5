"""Run pytest with a deadline for the whole run, and leave no process of the tests behind.

Used by scripts/test: ``python scripts/pytest_guard.py [pytest arguments]``.

On Linux this process makes itself a child subreaper: a process the tests start and then
orphan (a fleet, a Redis, a sandbox whose test was ended by a watchdog before its cleanup ran)
is reparented here instead of to init, and is killed when pytest ends, however it ended. A run
that passes its deadline (``PAYPOLL_TEST_DEADLINE`` seconds, default 1800; 0: none) gets SIGABRT
first, so that faulthandler (on under pytest) prints every thread's stack, then SIGKILL.
The exit status is pytest's (128 + N when it died of signal N).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
DEFAULT_DEADLINE = 1800.0
ABORT_GRACE = 30.0  # seconds between SIGABRT and SIGKILL at the deadline


def become_subreaper() -> bool:
    """Adopt this process's orphaned descendants (Linux); False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0


def children(pid: int) -> list[int]:
    """The live children of ``pid``, from /proc (empty where /proc is missing)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: ppid is 2 fields after it.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def reap() -> None:
    """Collect every exited child, so that none stays a zombie."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def describe(pid: int) -> str:
    """The process's command line, shortened (its pid when /proc cannot tell)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return str(pid)
    line = raw.replace(b"\0", b" ").decode(errors="replace").strip() or str(pid)
    return line[:120]


def kill_leftovers(rounds: int = 20) -> list[str]:
    """SIGKILL every process left under this one (a killed process's own children are
    reparented here and go in a later round); the command lines of those killed, so that the
    test that leaked them can be found."""
    killed: list[str] = []
    for _ in range(rounds):
        reap()
        left = children(os.getpid())
        if not left:
            break
        for pid in left:
            what = describe(pid)
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(what)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    reap()
    return killed


def run(args: list[str], deadline: float) -> int:
    """Run pytest with ``args`` within ``deadline`` seconds (0: none); its exit status."""
    pytest = subprocess.Popen([sys.executable, "-m", "pytest", *args])
    # Ctrl-C reaches pytest too (same process group): let it stop the tests, then clean up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = pytest.wait(timeout=deadline if deadline > 0 else None)
    except subprocess.TimeoutExpired:
        print(
            f"scripts/test: the run passed its {deadline:g} s deadline (PAYPOLL_TEST_DEADLINE); "
            "aborting it (every thread's stack follows)",
            file=sys.stderr,
            flush=True,
        )
        pytest.send_signal(signal.SIGABRT)
        try:
            code = pytest.wait(ABORT_GRACE)
        except subprocess.TimeoutExpired:
            pytest.kill()
            code = pytest.wait()
    return 128 - code if code < 0 else code


def main() -> int:
    deadline = float(os.environ.get("PAYPOLL_TEST_DEADLINE") or DEFAULT_DEADLINE)
    adopting = become_subreaper()
    code = run(sys.argv[1:], deadline)
    if adopting:
        left = kill_leftovers()
        if left:
            print(
                f"scripts/test: killed {len(left)} process(es) the tests left behind: "
                + "; ".join(left),
                file=sys.stderr,
            )
    return code


if __name__ == "__main__":
    sys.exit(main())
