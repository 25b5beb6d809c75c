"""The sending node of `scripts/chaos kill`: a real `ctxfs daemon` that records every ACK it receives.

    python scripts/chaos_kill_sender.py ACK_LOG ARM_FILE -- CTXFS-ARGS...

Runs `ctxfs CTXFS-ARGS...` (e.g. `--home A daemon --listen 127.0.0.1:0
--no-mdns`) in this process, with one observer wrapped around
`PeerSession._dispatch` (nothing under daemon/ is edited):

- every ACK a peer sends is appended to ACK_LOG as one line of hex ids,
  flushed before the ACK is handled. A peer ACKs OBJECTS only once it has
  committed them, so every id in ACK_LOG must be in that peer's store, even
  if the peer is killed a moment later. This is the sender's view of the
  ACK promise, taken outside the receiving process.
- if ARM_FILE exists when an ACK arrives, it is renamed to ARM_FILE.fired
  (rename happens once: exactly one side owns the kill) and the pid written
  in it gets SIGKILL: a kill "right after an ACK" as the sender saw it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon import cli, peer  # noqa: E402
from sync.messages import Ack  # noqa: E402


def observe(ack_log: Path, arm_file: Path) -> None:
    log = open(ack_log, "a", buffering=1)
    fired = arm_file.with_name(arm_file.name + ".fired")
    dispatch = peer.PeerSession._dispatch

    async def observed(self, event, nursery):
        message = event.message
        if isinstance(message, Ack):
            log.write(" ".join(i.hex() for i in message.ids) + "\n")
            log.flush()
            try:
                os.rename(arm_file, fired)
            except FileNotFoundError:
                pass
            else:
                os.kill(int(fired.read_text()), signal.SIGKILL)
        return await dispatch(self, event, nursery)

    peer.PeerSession._dispatch = observed


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    observe(Path(argv[0]), Path(argv[1]))
    return cli.main(argv[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
