"""`ctxfs mcp`: serve the home's memory to an AI tool over MCP on stdio.

The server (daemon/mcp_server.py) imports the `mcp` SDK, which takes a
moment; other commands never pay for it.
"""

from __future__ import annotations

import argparse
import os
import sys
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
    except (BaseExceptionGroup, OSError) as exc:
        if not _client_left(exc):
            raise
        # The AI tool closed our stdout (it quit, or dropped us mid-answer):
        # the normal end of a stdio server, not an error. What is still
        # buffered for stdout has nowhere to go; keep the interpreter's exit
        # from reporting that as an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0


def _client_left(exc: BaseException) -> bool:
    """Whether every failure in `exc` is the other end of stdio going away."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_client_left(e) for e in exc.exceptions)
    return isinstance(exc, (BrokenPipeError, ConnectionResetError))


def add_parser(sub: argparse._SubParsersAction) -> None:
    about = "serve this node's memory to an AI tool: an MCP server on stdin/stdout"
    p = sub.add_parser("mcp", help=about, description=about)
    p.add_argument("--ref", metavar="NAME", default="main", help="the ref the tools use by default (default: main)")
    p.set_defaults(func=cmd_mcp)
