"""Dispatch `scripts/chaos PART [options]` to scripts/chaos_PART.py, or run them all.

Each part module offers

    add_arguments(parser)          its options (with defaults for `all`)
    run(options) -> Outcome        runs the part, prints its own details

and the campaign prints one summary table: a part passes only when every
promise it checks held (no daemon exit, nothing acknowledged lost, ...).
Figures go to docs/reliability.md by hand, with the command that made them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos_common import Outcome  # noqa: E402

# In the order `all` runs them: cheapest first, root-only last.
PARTS = ("sim", "members", "clients", "kill", "disk", "net")


def _parser(part: str) -> argparse.ArgumentParser:
    module = importlib.import_module(f"chaos_{part}")
    parser = argparse.ArgumentParser(prog=f"scripts/chaos {part}", description=(module.__doc__ or "").split("\n")[0])
    module.add_arguments(parser)
    return parser


def _run(part: str, argv: list[str]) -> Outcome:
    print(f"== chaos {part} {' '.join(argv)}".rstrip(), flush=True)
    started = time.monotonic()
    try:
        module = importlib.import_module(f"chaos_{part}")
        options = _parser(part).parse_args(argv)
        outcome = module.run(options)
    except Exception as exc:  # a broken part is a failed part, not a stopped campaign
        import traceback
        traceback.print_exc()
        outcome = Outcome(part=part, ok=False, figures={"error": f"{type(exc).__name__}: {exc}"})
    outcome.figures.setdefault("seconds", round(time.monotonic() - started, 1))
    return outcome


def _stop_on_sigterm() -> None:
    """SIGTERM (a `timeout`, a CI cancel) unwinds like Ctrl-C, so every part's
    finally blocks kill their daemons and remove their namespaces and mounts."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)


def main() -> int:
    _stop_on_sigterm()
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help") or (args[0] not in PARTS and args[0] != "all"):
        print(f"usage: scripts/chaos {{all|{'|'.join(PARTS)}}} [options]; scripts/chaos PART --help", file=sys.stderr)
        return 2
    if args[0] == "all":
        outcomes = [_run(part, []) for part in PARTS]
    else:
        outcomes = [_run(args[0], args[1:])]
    print()
    print(f"{'part':<8} {'result':<7} figures")
    for outcome in outcomes:
        figures = ", ".join(f"{k}={v}" for k, v in outcome.figures.items())
        print(f"{outcome.part:<8} {'ok' if outcome.ok else 'FAILED':<7} {figures}")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
