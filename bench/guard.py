"""One benchmark run's guard rails, shared by `python -m bench` and `python -m bench.instructions`: a hard time
limit (SIGALRM), SIGTERM and SIGINT turned into a clean stop, and every process the run started stopped in a
`finally`, whatever ended it."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from types import FrameType
from typing import Protocol

from bench.tools import ToolMissing


class BenchTimeout(Exception):
    pass


class Run(Protocol):
    def setup(self) -> None: ...

    def close(self) -> None: ...


def arm(limit: float, what: str) -> None:
    """Raise BenchTimeout after `limit` seconds; SIGTERM and SIGINT (even if started ignored) as Ctrl-C."""

    def on_alarm(_sig: int, _frame: FrameType | None) -> None:
        raise BenchTimeout(f"{what} exceeded its time limit of {limit:.0f}s")

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.alarm(int(limit) + 1)


def run_guarded(run: Run, work: Callable[[], None]) -> int:
    """`run.setup()`, then `work()`, then `run.close()` always; the exit status: 0, 1 (a step failed), 2 (a tool
    is missing), 130 (interrupted) or 124 (out of time). What `work` collected before a failure is kept."""
    status = 0
    try:
        run.setup()
        work()
    except ToolMissing as e:
        print(f"error: {e}", file=sys.stderr)
        status = 2
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        status = 1
    except (KeyboardInterrupt, BenchTimeout) as e:
        print(f"\ninterrupted: {str(e) or 'Ctrl-C'}; stopping everything it started", file=sys.stderr, flush=True)
        status = 130 if isinstance(e, KeyboardInterrupt) else 124
    finally:
        signal.alarm(0)
        try:
            run.close()
        except KeyboardInterrupt:
            run.close()
    return status
