from __future__ import annotations

import pytest

from helpers import STORE_KINDS, make_store


@pytest.fixture(params=STORE_KINDS)
def store(request, tmp_path):
    """Each store implementation, fresh and empty (SQLite in tmp_path/s.db)."""
    s = make_store(request.param, tmp_path)
    yield s
    s.close()


@pytest.fixture
def paths(tmp_path):
    """A fresh, private home directory (nothing in it yet)."""
    from daemon.paths import HomePaths

    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    return HomePaths(home)
