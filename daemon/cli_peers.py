"""`ctxfs peer ...`: the running daemon's peer table from the command line.

Peers are known only to a running daemon (static ones from its options and
config, the others from mDNS and from who dialled it), so every command
here goes through its local API.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TextIO

from daemon import localapi
from daemon.cli import _NO_DAEMON, CliError, _via_daemon
from daemon.paths import HomePaths
from daemon.status import short_id


def cmd_peer_forget(args: argparse.Namespace, home: HomePaths, out: TextIO) -> int:
    async def work(client: localapi.LocalClient) -> list[dict]:
        return await client.peer_forget(args.peer)

    forgotten = _via_daemon(home, work)
    if forgotten is _NO_DAEMON:
        raise CliError(f"no daemon is running for {home.root}; only a running daemon has peers to forget")
    for peer in forgotten:
        print(f"forgot {short_id(peer.get('node_id'))} ({peer.get('address')})", file=out)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """`ctxfs peer SUBCOMMAND ...` on the main parser's subcommands."""
    about = "the running daemon's peers (forget)"
    peer = sub.add_parser("peer", help=about, description=about)
    commands = peer.add_subparsers(dest="peer_command", metavar="SUBCOMMAND", required=True)

    def add(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("forget", cmd_peer_forget,
            "drop a peer that is not connected from the status table and stop dialling it "
            "(a static one until the daemon restarts)")
    p.add_argument("peer", metavar="ID|ADDRESS",
                   help="a node id or a unique prefix of one (4+ hex digits), or HOST:PORT as status shows it")
