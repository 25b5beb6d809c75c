"""Logging for the daemon: plain lines or JSON lines, each with its time.

Plain lines carry a local timestamp with its UTC offset, except when stderr
is journald's (systemd says so in $JOURNAL_STREAM): the journal stamps every
line itself, and `journalctl` would show the time twice.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime

# The package whose loggers -v turns to DEBUG; -vv turns every logger (the
# libraries': zeroconf, asyncio) to DEBUG too.
OUR_LOGGERS = "daemon"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    """`2026-11-24 10:00:00.123+01:00 INFO daemon.node: message` (no time when `stamped` is False)."""

    def __init__(self, *, stamped: bool = True) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s" if stamped
                         else "%(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created).astimezone().isoformat(sep=" ", timespec="milliseconds")


def stderr_is_journal() -> bool:
    """True when stderr is connected to journald (systemd sets JOURNAL_STREAM=DEV:INODE of it)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        info = os.fstat(sys.stderr.fileno())
        return (int(device), int(inode)) == (info.st_dev, info.st_ino)
    except (ValueError, OSError, AttributeError):
        return False


def level_for(verbose: int = 0, quiet: int = 0) -> int:
    """-v: DEBUG, -q: WARNING only, -qq: ERROR only; the default is INFO."""
    steps = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR]
    return steps[max(0, min(len(steps) - 1, 1 - verbose + quiet))]


def configure(*, json_lines: bool = False, level: int = logging.INFO, everything: bool = False) -> None:
    """Only the CLI calls this; library modules just use logging.getLogger(__name__).

    `level` applies to our loggers; other libraries stay at INFO or above
    unless `everything` (-vv), so that -v shows the node, not zeroconf's packets.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else PlainFormatter(stamped=not stderr_is_journal()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if everything else max(level, logging.INFO))
    logging.getLogger(OUR_LOGGERS).setLevel(level)


class RateLimitedLog:
    """Log a repeating condition (a peer that keeps refusing) once per interval."""

    # Keys remembered; a flood of distinct keys (addresses) evicts the oldest
    # rather than growing the table.
    MAX_KEYS = 1024

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}

    def _due(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -self._interval) < self._interval:
            return False
        self._last.pop(key, None)
        self._last[key] = now
        while len(self._last) > self.MAX_KEYS:
            del self._last[next(iter(self._last))]
        return True

    def forget(self, key: str) -> None:
        """The condition ended: the next occurrence is logged at once."""
        self._last.pop(key, None)

    def warning(self, key: str, message: str, *args: object) -> None:
        if self._due(key):
            self._logger.warning(message, *args)

    def error(self, key: str, message: str, *args: object, exc_info: BaseException | None = None) -> None:
        if self._due(key):
            self._logger.error(message, *args, exc_info=exc_info)


def forget_traceback(exc: BaseException) -> None:
    """Drop what an exception keeps alive: its traceback's frames hold the
    session and its buffers, and its context chain may lead back to it in
    a cycle that only the cyclic collector would free."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        pending += [current.__context__, current.__cause__]
        if isinstance(current, BaseExceptionGroup):
            pending += current.exceptions
        current.__traceback__ = None
        current.__context__ = current.__cause__ = None
