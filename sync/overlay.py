"""Which peers a node keeps sessions with: a bounded-degree overlay.

With mDNS every node sees every other; dialling them all costs N - 1
sessions per node (keepalives, windows, anti-entropy rounds) and N(N-1)/2
TLS connections in a lab. Instead each node dials at most `degree` of the
nodes it knows, chosen by this pure function of node ids, so every node
computes its own links without asking anyone:

- **Ring fingers.** Place the ids on a ring by value (Chord's id space).
  Link to the successor (the next node on the ring), then to the first
  node at or after points 1/2, 1/4, ... of the ring ahead, spaced down to
  a couple of nodes. The successor links alone form a cycle through every
  node, so the overlay is connected whenever nodes share one view of who
  exists (mDNS gives that); the longer fingers keep the diameter near
  log(N). Sessions carry sync both ways, so a link serves both its ends.
  A node leaving moves only the links that pointed at it.
- **A few stable random links.** Ranked by SHA-256(own id ‖ candidate),
  so they are spread over the ring, differ per node, and do not churn when
  a choice is made again: they shorten paths further and keep the graph
  connected when views differ for a while (a node just come or gone).

When a node comes or goes, every node chooses again; links to nodes that
remain stay, unless the ring's size crosses a power of two (the fingers'
spread follows log2 of it).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

# Random links out of `degree` (the rest are fingers). Two are enough to
# bridge views that differ for a moment; more would take fingers away.
RANDOM_LINKS = 2


def finger_exponents(ring_size: int, fingers: int) -> list[int]:
    """Finger j points 1/2**j of the id space ahead. The exponents spread
    from 1 (half the ring) to about log2(ring_size) - 1 (a couple of nodes
    ahead); they change only when the ring's size crosses a power of two."""
    levels = max(ring_size.bit_length() - 2, 1)  # about log2(ring_size) - 1
    if fingers <= 1:
        return [1]
    return sorted({round(1 + (levels - 1) * k / (fingers - 1)) for k in range(fingers)})


def _position(node: bytes) -> int:
    return int.from_bytes(node[:8], "big")


def choose_links(own: bytes, known: Iterable[bytes], degree: int, *, random_links: int = RANDOM_LINKS) -> list[bytes]:
    """The ids this node should dial: at most `degree` of `known` (own id
    excluded): its successor, fingers, then random links; no id twice."""
    others = sorted(set(known) - {own})
    if degree <= 0 or not others:
        return []
    if len(others) <= degree:
        return others
    positions = [_position(p) for p in others]
    here = _position(own)

    def successor_of(point: int) -> bytes:
        # The first node at or after `point` on the ring (wrapping round).
        return others[bisect.bisect_left(positions, point) % len(others)]

    chosen = [successor_of(here + 1)]
    for exponent in finger_exponents(len(others) + 1, max(degree - random_links - 1, 0)):
        peer = successor_of((here + (1 << (64 - exponent))) % (1 << 64))
        if peer not in chosen and len(chosen) < degree:
            chosen.append(peer)
    for peer in sorted(others, key=lambda p: hashlib.sha256(own + p).digest()):
        if len(chosen) >= degree:
            break
        if peer not in chosen:
            chosen.append(peer)
    return chosen


def diameter(links: dict[bytes, Iterable[bytes]]) -> int | None:
    """Longest shortest path of the undirected graph the links make (a
    link serves both ends); None if it is not connected."""
    graph: dict[bytes, set[bytes]] = {node: set() for node in links}
    for node, peers in links.items():
        for peer in peers:
            graph[node].add(peer)
            graph.setdefault(peer, set()).add(node)
    longest = 0
    for start in graph:
        seen = {start}
        frontier = [start]
        depth = 0
        while frontier:
            following = [p for node in frontier for p in graph[node] if p not in seen]
            seen.update(following)
            frontier = list(dict.fromkeys(following))
            if frontier:
                depth += 1
        if len(seen) != len(graph):
            return None
        longest = max(longest, depth)
    return longest
