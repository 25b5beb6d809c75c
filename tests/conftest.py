from __future__ import annotations

import pytest

from helpers import STORE_KINDS, make_store


@pytest.fixture(params=STORE_KINDS)
def store(request, tmp_path):
    """Each store implementation, fresh and empty (SQLite in tmp_path/s.db)."""
    s = make_store(request.param, tmp_path)
    yield s
    s.close()
