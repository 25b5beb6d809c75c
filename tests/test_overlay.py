"""The bounded-degree overlay: who dials whom (sync/overlay.py)."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from sync.overlay import choose_links, diameter, finger_exponents


def ids(n: int, salt: str = "") -> list[bytes]:
    return [hashlib.sha256(f"{salt}{k}".encode()).digest() for k in range(n)]


def overlay(nodes: list[bytes], degree: int) -> dict[bytes, list[bytes]]:
    return {node: choose_links(node, nodes, degree) for node in nodes}


def test_few_nodes_are_all_linked():
    nodes = ids(5)
    for node in nodes:
        assert sorted(choose_links(node, nodes, 8)) == sorted(set(nodes) - {node})


def test_links_are_bounded_distinct_and_never_the_node_itself():
    nodes = ids(100)
    for node in nodes:
        links = choose_links(node, nodes, 8)
        assert len(links) == 8 and len(set(links)) == 8 and node not in links


def test_the_successor_on_the_ring_is_always_chosen():
    nodes = ids(64)
    ring = sorted(nodes)
    for k, node in enumerate(ring):
        assert ring[(k + 1) % len(ring)] in choose_links(node, nodes, 8)


def test_the_choice_depends_on_ids_only():
    nodes = ids(40)
    assert choose_links(nodes[3], nodes, 8) == choose_links(nodes[3], list(reversed(nodes)), 8)


def test_fingers_spread_from_half_the_ring_to_a_few_nodes_ahead():
    assert finger_exponents(256, 5) == [1, 2, 4, 6, 7]  # 1/2 ... 1/128 of the ring
    assert finger_exponents(16, 5) == [1, 2, 3]
    assert finger_exponents(2, 5) == [1]


def test_degree_and_diameter_do_not_grow_with_n():
    for n in (16, 64, 256):
        links = overlay(ids(n, "d"), 8)
        assert diameter(links) is not None and diameter(links) <= 5
        sessions = {node: set(links[node]) for node in links}
        for node, peers in links.items():
            for peer in peers:
                sessions[peer].add(node)
        # Each node dials 8; others' choices add about as many again.
        assert sum(len(s) for s in sessions.values()) / n <= 16


def test_a_node_leaving_moves_few_links():
    nodes = ids(120, "churn")  # 120 -> 119: no power of two crossed
    before = overlay(nodes, 8)
    gone = nodes[17]
    after = overlay([n for n in nodes if n != gone], 8)
    changed = sum(len(set(before[n]) - set(after[n])) for n in after)
    assert changed <= 2 * 8  # only links that pointed at the node that left
    assert diameter(after) is not None


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 80), degree=st.integers(1, 10), salt=st.text(max_size=4),
       hidden=st.integers(0, 79))
def test_connected_even_when_one_node_is_not_yet_seen_by_half(n, degree, salt, hidden):
    nodes = ids(n, salt)
    late = nodes[hidden % n]
    links = {}
    for k, node in enumerate(nodes):
        view = nodes if k % 2 or node == late else [x for x in nodes if x != late]
        links[node] = choose_links(node, view, degree)
        assert len(links[node]) <= degree
    assert diameter(links) is not None


def test_diameter_of_a_split_graph_is_none():
    a, b, c, d = ids(4, "split")
    assert diameter({a: [b], b: [], c: [d], d: []}) is None
    assert diameter({a: [b], b: [c], c: [d], d: []}) == 3
