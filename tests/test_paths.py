"""Tests for daemon.paths: where a node's home is when none is given."""

from __future__ import annotations

import pytest

from daemon import cli, paths


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """The platform's user data directory, moved under tmp_path; no $CTXFS_HOME."""
    monkeypatch.delenv(paths.HOME_ENV, raising=False)
    monkeypatch.setattr(paths.platformdirs, "user_data_dir", lambda name, appauthor=None: str(tmp_path / name))
    return tmp_path


def test_the_default_home_is_named_ctxfs(data_dir):
    assert paths.resolve_home(None) == data_dir / "ctxfs"


def test_a_home_made_before_the_rename_is_used_where_it_is(data_dir):
    former = data_dir / "contextfs"
    former.mkdir()
    assert paths.resolve_home(None) == former
    assert not (data_dir / "ctxfs").exists()  # nothing moved, nothing made


def test_when_both_exist_the_new_name_wins(data_dir):
    (data_dir / "contextfs").mkdir()
    (data_dir / "ctxfs").mkdir()
    assert paths.resolve_home(None) == data_dir / "ctxfs"


def test_explicit_homes_win_over_both(data_dir, monkeypatch):
    (data_dir / "contextfs").mkdir()
    assert paths.resolve_home(data_dir / "given") == data_dir / "given"
    monkeypatch.setenv(paths.HOME_ENV, str(data_dir / "env"))
    assert paths.resolve_home(None) == data_dir / "env"


def test_the_cli_keeps_serving_a_home_made_before_the_rename(data_dir, capsys):
    # Set up as an older ctxfs did, then used by this one without --home.
    former = data_dir / "contextfs"
    assert cli.main(["--home", str(former), "init"]) == 0
    node_id = capsys.readouterr().out.strip()
    assert cli.main(["init"]) == 0  # no --home: safe to repeat, the same node
    assert capsys.readouterr().out.strip() == node_id
    assert cli.main(["heads", "--ids"]) == 0
    assert capsys.readouterr().err == ""
    assert not (data_dir / "ctxfs").exists()


def test_a_fresh_machine_gets_a_home_named_ctxfs(data_dir, capsys):
    assert cli.main(["init"]) == 0
    assert (data_dir / "ctxfs" / "store.db").exists()
    assert not (data_dir / "contextfs").exists()
