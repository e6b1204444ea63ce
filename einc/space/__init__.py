"""Stage 3: the structure space. Enumerate candidate structures on an exponent lattice,
keep one per family, score them exactly at a width and rank them: :func:`search`.

Modules: ``lattice`` (index classes, lattice, symmetries), ``canonical`` (structures as
graphs, deduplication by graph isomorphism), ``score`` (numpy evaluation through
:mod:`einc.analysis.template`), ``rank`` (filters, sort keys, records), ``names`` (known
structures), ``measure`` (timing compiled modules), ``plot`` and ``cli``.
"""
from .lattice import Space
from .rank import SORT_KEYS, SearchResult, record, search, table, to_csv

__all__ = ["search", "Space", "SearchResult", "SORT_KEYS", "record", "table", "to_csv"]
