"""ContextQuery: filter an expansion by type, relevance, age and text.

The seed's QUERY_REQUEST was meant to run this and left it unimplemented.
`now` is passed in: the sync core reads no clock. A query with text needs
the store's full-text index: run it with `sync.fulltext.run_query`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta

import attrs

from sync.model import ExpandedContext, MemoryAtom, TypeSignature, to_utc


# timedelta tops out near 8.6e13 s; any age beyond ~3000 years is "no limit".
MAX_AGE_SECONDS = 1e11
# Characters of query text: a long question, not a document; every word is
# one more term of the FTS query (sync/fulltext.py).
MAX_TEXT_LENGTH = 4096


def _non_negative(what: str):
    def check(_inst: object, _attr: object, value: float | int | None) -> None:
        if value is not None and not value >= 0:
            raise ValueError(f"{what} must be a number >= 0, got {value}")

    return check


def _max_age(_inst: object, _attr: object, value: float | None) -> None:
    if value is not None and not 0 <= value <= MAX_AGE_SECONDS:
        raise ValueError(f"max_age_seconds must be between 0 and {MAX_AGE_SECONDS:g}, got {value}")


def _text(_inst: object, _attr: object, value: str | None) -> None:
    if value is not None and len(value) > MAX_TEXT_LENGTH:
        raise ValueError(f"text is {len(value)} characters; the limit is {MAX_TEXT_LENGTH}")


@attrs.frozen(kw_only=True)
class ContextQuery:
    type_filter: TypeSignature | None = None
    min_relevance: float = attrs.field(default=0.0, validator=_non_negative("min_relevance"))
    max_age_seconds: float | None = attrs.field(default=None, validator=_max_age)
    limit: int | None = attrs.field(default=None, validator=_non_negative("limit"))
    # Words to match in atom content (sync/fulltext.py); None or blank: no text filter.
    text: str | None = attrs.field(default=None, validator=_text)

    @property
    def has_text(self) -> bool:
        return self.text is not None and self.text.strip() != ""

    def matches(self, atom: MemoryAtom, now: datetime) -> bool:
        if atom.relevance_score < self.min_relevance:
            return False
        if self.type_filter is not None and atom.type_sig.unify(self.type_filter) is None:
            return False
        if self.max_age_seconds is not None:
            if to_utc(now) - atom.timestamp > timedelta(seconds=self.max_age_seconds):
                return False
        return True

    def execute(
        self, expanded: ExpandedContext, now: datetime, *, text_ranks: Mapping[str, float] | None = None
    ) -> list[MemoryAtom]:
        """Matching atoms, most relevant first, at most `limit` of them.

        With text, `text_ranks` maps the id of each atom matching it to its
        rank (lower is better; sync.fulltext computes it): only those atoms
        are kept, best rank first, then most relevant."""
        if self.has_text:
            if text_ranks is None:
                raise ValueError("a query with text needs the store's index: run it with sync.fulltext.run_query")
            hits = [a for a in expanded.atoms if a.content_hash in text_ranks and self.matches(a, now)]
            hits.sort(key=lambda a: (text_ranks[a.content_hash], -a.relevance_score))  # stable, as below
        else:
            hits = [a for a in expanded.atoms if self.matches(a, now)]
            hits.sort(key=lambda a: -a.relevance_score)  # stable: expansion order for ties
        return hits if self.limit is None else hits[: self.limit]
