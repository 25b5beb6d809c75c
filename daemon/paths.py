"""Where a node keeps its files. One directory, the node's home, holds all."""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import platformdirs

APP_NAME = "ctxfs"
# The default home's name before it was ctxfs like everything else.
FORMER_APP_NAME = "contextfs"
HOME_ENV = "CTXFS_HOME"


def default_home() -> Path:
    """The platform's user data dir for ctxfs (`~/.local/share/ctxfs`).

    A machine set up before the rename has only `.../contextfs`: that home
    is used where it is, never moved. A daemon, an MCP server or a service
    may be running from it this moment, with its socket and store open, and
    tools are configured with its path; moving it under them would split
    the node. (docs/operations.md says how to move it by hand.)
    """
    home = Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))
    former = Path(platformdirs.user_data_dir(FORMER_APP_NAME, appauthor=False))
    if not home.exists() and former.is_dir():
        return former
    return home


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
