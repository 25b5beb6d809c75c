"""`ctxfs mcp`: serve the home's memory to an AI tool over MCP on stdio.

The server (daemon/mcp_server.py) imports the `mcp` SDK, which takes a
moment; other commands never pay for it.
"""

from __future__ import annotations

import argparse
from typing import TextIO

from daemon.paths import HomePaths


def cmd_mcp(args: argparse.Namespace, home: HomePaths, out: TextIO) -> int:
    from daemon.cli import CliError
    from daemon.cli_refs import ref_name
    from daemon.mcp_server import run_mcp

    name = ref_name(args.ref)
    if not home.is_initialised():
        raise CliError(f"no ctxfs node at {home.root}; run `ctxfs init` first")
    try:
        run_mcp(home, name)
    except KeyboardInterrupt:
        pass
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    about = "serve this node's memory to an AI tool: an MCP server on stdin/stdout"
    p = sub.add_parser("mcp", help=about, description=about)
    p.add_argument("--ref", metavar="NAME", default="main", help="the ref the tools use by default (default: main)")
    p.set_defaults(func=cmd_mcp)
