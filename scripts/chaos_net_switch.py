"""A learning Ethernet switch in user space that impairs what it forwards, as netem would.

    ip netns exec BRIDGE-NS python scripts/chaos_net_switch.py [impairments] PORT...

The stand-in for `tc qdisc ... netem` where the kernel has no sch_netem
(chaos_net.py uses it only then, and says so). Run in the bed's bridge
namespace on ports that are detached from br0, it forwards every frame
between them like a bridge (learns source MACs, floods multicast, broadcast
and unknown destinations) after deciding the frame's fate once, on entry,
the way netem on the sending host's eth0 would:

- lost with probability --loss;
- otherwise sent at once with probability --reorder (netem's `reorder`: it
  overtakes the delayed frames), else after --delay-ms ± --jitter-ms
  (uniform, as netem without a distribution table), so frames reorder;
- with probability --duplicate a second copy follows, with its own delay.

Frames are read and written with a virtio-net header (PACKET_VNET_HDR), so
TSO/GSO frames and partial checksums cross it as they would cross a bridge.
Prints `ready` once every port is open; on SIGTERM prints one JSON line of
counters to stdout and exits 0.
"""

from __future__ import annotations

import argparse
import ctypes
import heapq
import json
import os
import random
import selectors
import signal
import socket
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
VNET_HDR = 10
PR_SET_PDEATHSIG = 1
# veth's largest GSO frame is 64 KiB; a frame that does not fit is counted and dropped.
FRAME_MAX = 256 * 1024
# The longest the loop sleeps with nothing due, so that SIGTERM is noticed soon.
IDLE_WAIT = 0.2


class Switch:
    def __init__(self, ports: list[str], *, delay: float, jitter: float, loss: float,
                 reorder: float, duplicate: float, seed: int | None) -> None:
        self.ports = ports
        self.delay, self.jitter = delay, jitter
        self.loss, self.reorder, self.duplicate = loss, reorder, duplicate
        self.random = random.Random(seed)
        self.socks: list[socket.socket] = []
        self.macs: dict[bytes, int] = {}
        self.due: list[tuple[float, int, int, bytes]] = []
        self.seq = 0
        self.counts = {"frames": 0, "lost": 0, "immediate": 0, "duplicated": 0, "sent": 0,
                       "send_errors": 0, "truncated": 0}

    def open(self) -> None:
        for name in self.ports:
            # Protocol 0 until bound: no frame of another interface slips in before bind.
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            sock.bind((name, ETH_P_ALL))
            sock.setblocking(False)
            self.socks.append(sock)

    def _schedule(self, when: float, port: int, frame: bytes) -> None:
        self.seq += 1
        heapq.heappush(self.due, (when, self.seq, port, frame))

    def _latency(self) -> float:
        if self.random.random() < self.reorder:
            self.counts["immediate"] += 1
            return 0.0
        return max(0.0, self.delay + self.random.uniform(-self.jitter, self.jitter))

    def receive(self, port: int) -> None:
        sock = self.socks[port]
        while True:
            try:
                frame, _, flags, _ = sock.recvmsg(FRAME_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # the port went down under us; its frames are lost, as on a wire
            if flags & socket.MSG_TRUNC:
                self.counts["truncated"] += 1
                continue
            if len(frame) < VNET_HDR + 14:
                continue
            self.counts["frames"] += 1
            eth = frame[VNET_HDR:]
            self.macs[eth[6:12]] = port
            if self.random.random() < self.loss:
                self.counts["lost"] += 1
                continue
            copies = 1
            if self.random.random() < self.duplicate:
                self.counts["duplicated"] += 1
                copies = 2
            now = time.monotonic()
            for _ in range(copies):
                self._schedule(now + self._latency(), port, frame)

    def _outputs(self, port: int, frame: bytes) -> list[int]:
        dst = frame[VNET_HDR:VNET_HDR + 6]
        if not dst[0] & 1:
            known = self.macs.get(dst)
            if known is not None:
                return [] if known == port else [known]
        return [p for p in range(len(self.socks)) if p != port]

    def send_due(self) -> None:
        now = time.monotonic()
        while self.due and self.due[0][0] <= now:
            _, _, port, frame = heapq.heappop(self.due)
            for out in self._outputs(port, frame):
                try:
                    self.socks[out].send(frame)
                    self.counts["sent"] += 1
                except OSError:
                    self.counts["send_errors"] += 1  # the host's link is down: the frame is lost

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        for port, sock in enumerate(self.socks):
            selector.register(sock, selectors.EVENT_READ, port)
        while True:
            wait = IDLE_WAIT if not self.due else min(IDLE_WAIT, max(0.0, self.due[0][0] - time.monotonic()))
            for key, _ in selector.select(wait):
                self.receive(key.data)
            self.send_due()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="chaos_net_switch.py", description=__doc__.split("\n")[0])
    parser.add_argument("ports", nargs="+")
    parser.add_argument("--delay-ms", type=float, default=100.0)
    parser.add_argument("--jitter-ms", type=float, default=20.0)
    parser.add_argument("--loss", type=float, default=0.10, help="probability, 0..1")
    parser.add_argument("--reorder", type=float, default=0.25, help="probability, 0..1")
    parser.add_argument("--duplicate", type=float, default=0.01, help="probability, 0..1")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    switch = Switch(args.ports, delay=args.delay_ms / 1000, jitter=args.jitter_ms / 1000, loss=args.loss,
                    reorder=args.reorder, duplicate=args.duplicate, seed=args.seed)
    # Die with the campaign (`ip netns exec` execs us: the parent is chaos_net.py), even a SIGKILLed one.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:
        return 1
    switch.open()

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    try:
        switch.run()
    finally:
        print(json.dumps(switch.counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
