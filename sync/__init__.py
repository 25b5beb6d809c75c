"""ctxfs's sans-IO core: the context model, canonical encoding, stores,
expansion and the sync protocol. Nothing here imports trio or reads a clock.

The names below are the seed's, so code written against it reads naturally.
"""

from sync.expand import ExpanderFunctor, ExpansionChunk, IncrementalExpander, compose, stream_expansion
from sync.model import (
    T_ANY,
    T_BOOL,
    T_CONTEXT,
    T_DICT,
    T_FLOAT,
    T_INT,
    T_LIST,
    T_STRING,
    T_TIMESTAMP,
    CompressedContext,
    ExpandedContext,
    Kind,
    MemoryAtom,
    MemoryMolecule,
    TypeSignature,
)
from sync.query import ContextQuery
from sync.store import ContextStore, InMemoryContextStore, SQLiteContextStore

__all__ = [
    "T_ANY", "T_BOOL", "T_CONTEXT", "T_DICT", "T_FLOAT", "T_INT", "T_LIST", "T_STRING", "T_TIMESTAMP",
    "CompressedContext", "ContextQuery", "ContextStore", "ExpandedContext", "ExpanderFunctor",
    "ExpansionChunk", "IncrementalExpander", "InMemoryContextStore", "Kind", "MemoryAtom",
    "MemoryMolecule", "SQLiteContextStore", "TypeSignature", "compose", "stream_expansion",
]
