"""Starting and stopping helper processes by PID."""

from __future__ import annotations

import subprocess


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> int | None:
    """SIGTERM the process (by its PID), wait up to `timeout`, then SIGKILL.
    Returns its exit status (negative for a signal)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode
