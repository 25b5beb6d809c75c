"""Tests for daemon.logs: the time on every line, levels, the journal, rate limits."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys

import pytest

from daemon import logs


@pytest.fixture
def restore_logging():
    """configure() changes process-wide state: put it back for the tests after."""
    root, ours = logging.getLogger(), logging.getLogger(logs.OUR_LOGGERS)
    saved = root.handlers[:], root.level, ours.level
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    ours.setLevel(saved[2])


@pytest.fixture
def emit(monkeypatch, tmp_path, restore_logging):
    """emit(journal=False, **configure_options): configure with stderr a
    real file (fstat must work), log one INFO and one DEBUG line; the text written."""
    count = 0

    def call(*, journal: bool = False, **options) -> str:
        nonlocal count
        count += 1
        stream = open(tmp_path / f"stderr.{count}", "w+")
        monkeypatch.setattr(sys, "stderr", stream)
        if journal:
            info = os.fstat(stream.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        else:
            monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        logs.configure(**options)
        logging.getLogger("daemon.node").info("listening on %s", "127.0.0.1:7787")
        logging.getLogger("daemon.node").debug("a detail")
        stream.flush()
        stream.seek(0)
        text = stream.read()
        stream.close()
        return text

    return call


def test_plain_lines_carry_a_local_time_with_its_offset(emit):
    [line] = emit().splitlines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d INFO daemon\.node: listening on 127\.0\.0\.1:7787", line
    ), line


def test_under_journald_the_journal_gives_the_time(emit):
    assert emit(journal=True) == "INFO daemon.node: listening on 127.0.0.1:7787\n"


def test_a_journal_stream_that_is_not_our_stderr_is_ignored(monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # no file descriptor at all: no journal either
    assert not logs.stderr_is_journal()


def test_json_lines_have_a_utc_time(emit):
    entry = json.loads(emit(json_lines=True))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert entry["level"] == "info" and entry["message"] == "listening on 127.0.0.1:7787"


def test_levels_for_verbose_and_quiet():
    assert logs.level_for() == logging.INFO
    assert logs.level_for(verbose=1) == logs.level_for(verbose=3) == logging.DEBUG
    assert logs.level_for(quiet=1) == logging.WARNING
    assert logs.level_for(quiet=2) == logs.level_for(quiet=5) == logging.ERROR
    assert logs.level_for(verbose=1, quiet=1) == logging.INFO


def test_verbose_shows_our_debug_lines_but_not_the_libraries(emit):
    text = emit(level=logging.DEBUG)
    assert "DEBUG daemon.node: a detail" in text
    assert logging.getLogger("a.library").getEffectiveLevel() == logging.INFO
    emit(level=logging.DEBUG, everything=True)
    assert logging.getLogger("a.library").getEffectiveLevel() == logging.DEBUG


def test_quiet_hides_info(emit):
    assert emit(level=logging.WARNING) == ""


def test_a_rate_limited_condition_is_logged_again_once_forgotten(caplog):
    limited = logs.RateLimitedLog(logging.getLogger("daemon.test"), interval=3600)
    caplog.set_level(logging.WARNING, logger="daemon.test")
    for _ in range(3):
        limited.warning("peer-a", "peer a away")
    limited.warning("peer-b", "peer b away")
    limited.forget("peer-a")
    limited.warning("peer-a", "peer a away again")
    assert [r.getMessage() for r in caplog.records] == ["peer a away", "peer b away", "peer a away again"]
