"""Merging two lines of contexts: B's changes, replayed on top of A.

A context has one base, so lineages are chains and two contexts share a
prefix of their lineages (nothing, if their roots differ). The nearest
common ancestor is the last context of that prefix; with none, the
ancestor is the empty context.

The merge of B into A is a new context whose base is A and whose delta is
B's changes since the ancestor, as far as A does not already hold them
(`docs/architecture.md`, "Merging", has the rule and its edge cases):

- added: every atom live in B that is not live, with the same value, in
  the ancestor (B added it, or re-added it with another relevance,
  timestamp or source) and not live with the same value in A;
- removed: every atom live in the ancestor, gone in B and still live in A;
- molecules: those added on B's side since the ancestor and not also added
  on A's side.

The merge has no second parent: `compression_metadata["merge"]` records
ours, theirs and the ancestor, for people; the next merge again finds the
ancestor through base links only. No clock is read, so two nodes merging
the same pair with the same message make the same context, with one id.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import attrs

from sync.expand import ExpanderFunctor
from sync.model import CompressedContext, MemoryAtom, MemoryMolecule, is_id
from sync.store import ContextStore


class MergeOutcome(enum.Enum):
    UP_TO_DATE = "up to date"  # A holds every change of B: nothing to store
    FAST_FORWARD = "fast-forward"  # B builds on A: B is the merge, nothing to store
    MERGED = "merged"  # a new context on top of A


@attrs.frozen(kw_only=True)
class MergeResult:
    outcome: MergeOutcome
    ours: str
    theirs: str
    ancestor: str | None
    # The new context (MERGED only): base `ours`, B's changes as its delta.
    context: CompressedContext | None
    # Lineages root first, for callers that check what a ref would lose.
    ours_lineage: tuple[str, ...]
    theirs_lineage: tuple[str, ...]

    @property
    def target(self) -> str:
        """The context that holds both sides: what a ref moves to."""
        if self.outcome is MergeOutcome.MERGED:
            return self.context.id
        return self.theirs if self.outcome is MergeOutcome.FAST_FORWARD else self.ours


def nearest_common_ancestor(lineage_a: Sequence[str], lineage_b: Sequence[str]) -> str | None:
    """The deepest context in both lineages (given root first); None if they share no root."""
    ancestor = None
    for x, y in zip(lineage_a, lineage_b):
        if x != y:
            break
        ancestor = x
    return ancestor


def _live(expander: ExpanderFunctor, context_id: str | None) -> dict[str, MemoryAtom]:
    """Live atoms by id, in expansion order (most relevant first)."""
    if context_id is None:
        return {}
    return {atom.content_hash: atom for atom in expander.ordered_atoms(context_id)}


def _molecules_since(store: ContextStore, context_id: str, ancestor: str | None) -> list[MemoryMolecule]:
    """Molecules added on the way from `ancestor` (exclusive) to `context_id`, in lineage order."""
    deltas = []
    for cid, ctx in store.walk_back(context_id):
        if cid == ancestor:
            break
        deltas.append(ctx.delta_molecules)
    return [m for molecules in reversed(deltas) for m in molecules]


def merge_delta(store: ContextStore, ours: str, theirs: str, ancestor: str | None, *,
                message: str | None = None, expander: ExpanderFunctor | None = None) -> CompressedContext:
    """The context on top of `ours` carrying `theirs`'s changes since `ancestor` (it may be empty)."""
    expander = expander or ExpanderFunctor(store)
    base, b_live, a_live = _live(expander, ancestor), _live(expander, theirs), _live(expander, ours)
    added = [atom for h, atom in b_live.items() if base.get(h) != atom and a_live.get(h) != atom]
    removed = frozenset(h for h in base if h not in b_live and h in a_live)
    a_molecules = _molecules_since(store, ours, ancestor)
    molecules = [m for m in _molecules_since(store, theirs, ancestor) if m not in a_molecules]
    metadata = {
        "message": message if message is not None else f"merge {theirs[:12]} into {ours[:12]}",
        "merge": {"ours": ours, "theirs": theirs, "ancestor": ancestor},
    }
    return CompressedContext(ours, added, molecules, removed, metadata)


def merge_contexts(store: ContextStore, ours: str, theirs: str, *, message: str | None = None,
                   expander: ExpanderFunctor | None = None) -> MergeResult:
    """Merge stored context `theirs` (B) into stored context `ours` (A).

    UP_TO_DATE when B is A or an ancestor of A, or when A already holds
    every change of B; FAST_FORWARD when A is an ancestor of B; else MERGED
    with the new (unstored) context.
    """
    lineage_a, lineage_b = tuple(store.get_lineage(ours)), tuple(store.get_lineage(theirs))
    ancestor = nearest_common_ancestor(lineage_a, lineage_b)

    def result(outcome: MergeOutcome, context: CompressedContext | None = None) -> MergeResult:
        return MergeResult(outcome=outcome, ours=ours, theirs=theirs, ancestor=ancestor, context=context,
                           ours_lineage=lineage_a, theirs_lineage=lineage_b)

    if ancestor == theirs:
        return result(MergeOutcome.UP_TO_DATE)
    if ancestor == ours:
        return result(MergeOutcome.FAST_FORWARD)
    merged = merge_delta(store, ours, theirs, ancestor, message=message, expander=expander)
    if merged.delta_size == 0:
        return result(MergeOutcome.UP_TO_DATE)
    return result(MergeOutcome.MERGED, merged)


def merged_into(store: ContextStore, heads: Sequence[str]) -> set[str]:
    """Every context whose changes `heads` hold by history: their lineages,
    and the lineages of every `theirs` a merge on them records (recursively).

    What `merge --ref` checks a ref's candidates against, so that merging
    three candidates two at a time is not refused at the second step.
    """
    seen: set[str] = set()
    todo = [h for h in heads if h is not None]
    while todo:
        for cid, ctx in store.walk_back(todo.pop()):
            if cid in seen:
                break
            seen.add(cid)
            merge = ctx.compression_metadata.get("merge")
            theirs = merge.get("theirs") if isinstance(merge, dict) else None
            if is_id(theirs) and theirs not in seen and store.has(theirs):
                todo.append(theirs)
    return seen
