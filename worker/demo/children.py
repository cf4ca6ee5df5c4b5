"""Child processes that cannot outlive the demo.

Each child runs in a new session (its own process group), so a Ctrl-C typed at the terminal
reaches the demo only and the demo stops its children in order. Each child also asks Linux to
SIGTERM it when the demo dies (``PR_SET_PDEATHSIG``), which covers a SIGKILLed demo. Stopping
signals the whole group (the fleet's worker processes are in it), waits, then SIGKILLs whatever
is left of the group.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

PR_SET_PDEATHSIG = 1  # prctl option: the kernel signals this process when its parent dies
STOP_GRACE = 20.0  # seconds a child gets after SIGTERM (the fleet finishes its running steps)


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM when the demo dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """One subprocess, leader of its own process group, with its stderr kept in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path,
        stdout: int | IO[bytes] | None = subprocess.DEVNULL,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=self._log,
            start_new_session=True,
            # Runs between fork and exec; the demo starts children from its main thread only.
            preexec_fn=_die_with_parent,
        )
        self.pid = self.process.pid
        self._stopped = False

    def alive(self) -> bool:
        """True while the child itself has not exited."""
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        """The last ``lines`` lines the child wrote to stderr (for error messages)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM the child's process group, wait up to ``grace`` s, then SIGKILL the group.

        Returns once the child has been reaped; the group is SIGKILLed even when the leader
        exited first, so no grandchild survives either. Calling it again does nothing.
        """
        if self.alive():
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace)
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        # Grandchildren in the group die from SIGKILL at once; give the kernel a moment to
        # finish them so "no process outlives the demo" holds when we return.
        deadline = time.monotonic() + 2.0
        while _group_exists(self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


def _group_exists(pgid: int) -> bool:
    """True while any process is in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
