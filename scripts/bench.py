"""Dispatch `scripts/bench SUBCOMMAND ...` to scripts/bench_SUBCOMMAND.py."""

import importlib
import sys
from pathlib import Path

SUBCOMMANDS = ("expand", "reconcile", "node", "bed", "refs", "mcp", "push", "cluster")


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in SUBCOMMANDS:
        print(f"usage: scripts/bench {{{'|'.join(SUBCOMMANDS)}}} [options]", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    module = importlib.import_module(f"bench_{sys.argv[1]}")
    return module.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
