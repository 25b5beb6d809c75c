"""ContextQuery: filter an expansion by type, relevance and age.

The seed's QUERY_REQUEST was meant to run this and left it unimplemented.
`now` is passed in: the sync core reads no clock.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import attrs

from sync.model import ExpandedContext, MemoryAtom, TypeSignature, to_utc


# timedelta tops out near 8.6e13 s; any age beyond ~3000 years is "no limit".
MAX_AGE_SECONDS = 1e11


def _non_negative(what: str):
    def check(_inst: object, _attr: object, value: float | int | None) -> None:
        if value is not None and not value >= 0:
            raise ValueError(f"{what} must be a number >= 0, got {value}")

    return check


def _max_age(_inst: object, _attr: object, value: float | None) -> None:
    if value is not None and not 0 <= value <= MAX_AGE_SECONDS:
        raise ValueError(f"max_age_seconds must be between 0 and {MAX_AGE_SECONDS:g}, got {value}")


@attrs.frozen(kw_only=True)
class ContextQuery:
    type_filter: TypeSignature | None = None
    min_relevance: float = attrs.field(default=0.0, validator=_non_negative("min_relevance"))
    max_age_seconds: float | None = attrs.field(default=None, validator=_max_age)
    limit: int | None = attrs.field(default=None, validator=_non_negative("limit"))

    def matches(self, atom: MemoryAtom, now: datetime) -> bool:
        if atom.relevance_score < self.min_relevance:
            return False
        if self.type_filter is not None and atom.type_sig.unify(self.type_filter) is None:
            return False
        if self.max_age_seconds is not None:
            if to_utc(now) - atom.timestamp > timedelta(seconds=self.max_age_seconds):
                return False
        return True

    def execute(self, expanded: ExpandedContext, now: datetime) -> list[MemoryAtom]:
        """Matching atoms, most relevant first, at most `limit` of them."""
        hits = [a for a in expanded.atoms if self.matches(a, now)]
        hits.sort(key=lambda a: -a.relevance_score)  # stable: expansion order for ties
        return hits if self.limit is None else hits[: self.limit]
