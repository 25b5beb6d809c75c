"""Where a node keeps its files. One directory, the node's home, holds all."""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import platformdirs

APP_NAME = "contextfs"
HOME_ENV = "CTXFS_HOME"


def default_home() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def resolve_home(explicit: str | os.PathLike | None) -> Path:
    """--home wins, then $CTXFS_HOME, then the platform's user data dir."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return default_home()


@attrs.frozen
class HomePaths:
    root: Path = attrs.field(converter=Path)  # a str or any PathLike is taken too

    @property
    def store(self) -> Path:
        return self.root / "store.db"

    @property
    def cluster_key(self) -> Path:
        return self.root / "cluster.key"

    @property
    def node_key(self) -> Path:
        return self.root / "node.key"

    @property
    def api_socket(self) -> Path:
        return self.root / "api.sock"

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    def is_initialised(self) -> bool:
        return self.store.exists() and self.cluster_key.exists() and self.node_key.exists()
