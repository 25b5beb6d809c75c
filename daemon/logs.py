"""Logging for the daemon: plain lines (journald adds the time) or JSON lines."""

from __future__ import annotations

import json
import logging
import sys
import time


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


def configure(*, json_lines: bool = False, level: int = logging.INFO) -> None:
    """Only the CLI calls this; library modules just use logging.getLogger(__name__)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


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
