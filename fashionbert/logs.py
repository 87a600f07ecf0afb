"""What the stages tell an operator: stdlib logging with timestamps, and progress that suits where it goes.

`setup_logging` configures the process once (the CLI, the demo, `python -m fashionbert.train`):

    2026-12-03 07:12:01 INFO fashionbert.rank.retrieve: retrieve: start features=... model=...

`progress(total, desc, unit)` is a tqdm bar on a terminal, and otherwise (cron, `>> file`) an INFO line at most every
`interval` seconds plus a final one:

    2026-12-03 07:12:31 INFO fashionbert.progress: rerank: 40960/120345 pairs (34%), 1365.3 pairs/s, eta 58 s

Imports the standard library only (tqdm when a bar is drawn), so every layer and `fashionbert --help` may use it.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Protocol

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
PROGRESS_INTERVAL_S = 30.0
# Our loggers say INFO; other libraries' stay at WARNING (Beam and transformers are chatty at INFO).
OUR_LOGGERS = ("fashionbert", "pipelines", "schemas")

progress_log = logging.getLogger("fashionbert.progress")


class _QuietBeamImports(logging.Filter):
    """Beam warns on import that Google Cloud client libraries are absent: true, and irrelevant unless the
    user runs on Dataflow (where setup.py installs them). Keep stderr for messages that need action."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


def setup_logging(verbose: bool = False, stream=None) -> logging.Handler:
    """One stderr handler on the root logger with time and level (replacing the one an earlier call installed);
    fashionbert's loggers at INFO (DEBUG when `verbose`), everything else at WARNING."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_fashionbert", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    handler.addFilter(_QuietBeamImports())
    handler._fashionbert = True
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    return handler


# ============================================================================================ progress
class Progress(Protocol):
    """What the stages call: tqdm's subset that both kinds of progress implement."""

    def update(self, n: int = 1) -> None: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None: ...

    def write(self, s: str) -> None: ...

    def close(self) -> None: ...


class LogProgress:
    """Progress as log lines: `desc: done/total unit (pct%), rate unit/s, eta` at most every `interval` seconds
    (when an update lands after it has passed), and a final line with the total time on `close`."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", interval: float = PROGRESS_INTERVAL_S,
                 initial: int = 0, logger: logging.Logger = progress_log, clock=time.monotonic):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = self.start_n = initial
        self.logger, self.clock = logger, clock
        self.t_start = self.t_last = clock()
        self.postfix = ""
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.t_last >= self.interval:
            self.t_last = now
            self.logger.info(self._line(now))

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def write(self, s: str) -> None:
        self.logger.info(s)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = self.clock()
        self.logger.info(f"{self._line(now, eta=False)}; done in {now - self.t_start:.1f} s")

    def _line(self, now: float, eta: bool = True) -> str:
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self.start_n) / max(now - self.t_start, 1e-9)
        line = f"{self.desc}: {done} {self.unit}{pct}, {rate:.1f} {self.unit}/s"
        if eta and self.total and rate > 0:
            line += f", eta {(self.total - self.n) / rate:.0f} s"
        return line + (f" | {self.postfix}" if self.postfix else "")

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NoProgress:
    """Says nothing (the processes of a distributed run other than the main one)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def write(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress(total: int | None, desc: str, unit: str = "it", *, bar: bool = True, enabled: bool = True,
             interval: float = PROGRESS_INTERVAL_S, initial: int = 0) -> Progress:
    """A tqdm bar when `bar` and stderr is a terminal; log lines every `interval` seconds otherwise; nothing when not
    `enabled`. Use it as a context manager, or call `close()`."""
    if not enabled:
        return NoProgress()
    if bar and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, file=sys.stderr)
    return LogProgress(total, desc, unit, interval, initial)
