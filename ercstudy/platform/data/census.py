"""prepare-data's first pass: each input's documents per domain, the domains the shards keep, and the held-out draw.

The held-out documents are drawn up front, from the counts alone: for each domain, exactly
round(eval_fraction x documents) of its documents (at least one, and one fewer than all), spread over
the inputs by successive hypergeometric draws from `seed` (which input holds how many of them), then
placed within each input by that input's own seeded draw (packing.held_out). Every subset of that size
is equally likely, and no input's work waits for another's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ercstudy.platform.data import readers

OTHER = "other"  # the domain that pools the domains past --max-domains
HYPERGEOMETRIC_LIMIT = 10**9  # numpy draws hypergeometric variates for populations below this


@dataclass
class Census:
    """One input's documents per domain (in the order met) and UTF-8 bytes."""

    documents: dict[str, int] = field(default_factory=dict)
    text_bytes: int = 0

    def count(self, domain: str, doc: str) -> str:
        self.documents[domain] = self.documents.get(domain, 0) + 1
        self.text_bytes += len(doc.encode("utf-8"))
        return doc


def count(source: readers.Source, *, text_field: str, domain_field: str | None) -> Census:
    """Read one input through and count it."""
    census = Census()
    for domain, doc in readers.records(source, text_field=text_field, domain_field=domain_field):
        census.count(domain, doc)
    return census


def kept_domains(censuses: list[Census], max_domains: int) -> tuple[dict[str, str], list[str]]:
    """(a record's domain -> its domain in the shards, the shards' domains in the order first met): the
    `max_domains` with the most documents keep their names, the rest are pooled as OTHER."""
    totals: dict[str, int] = {}
    for census in censuses:
        for d, n in census.documents.items():
            totals[d] = totals.get(d, 0) + n
    kept = set(sorted(totals, key=lambda d: -totals[d])[:max_domains])
    names = {d: (d if d in kept else OTHER) for d in totals}
    return names, list(dict.fromkeys(names.values()))


def per_domain(census: Census, names: dict[str, str]) -> dict[str, int]:
    """An input's documents per shard domain."""
    out: dict[str, int] = {}
    for d, n in census.documents.items():
        out[names[d]] = out.get(names[d], 0) + n
    return out


def held_out_counts(documents: list[dict[str, int]], fraction: float, seed: int, index: dict[str, int]) -> list[dict[str, int]]:
    """Per input, how many of its documents of each shard domain are held out (see the module's docstring)."""
    held: list[dict[str, int]] = [dict.fromkeys(docs, 0) for docs in documents]
    for d, number in index.items():
        n = sum(docs.get(d, 0) for docs in documents)
        k = min(n - 1, max(1, round(fraction * n))) if n > 1 else 0
        rng = np.random.default_rng([seed, 0, number])
        for docs, out in zip(documents, held):
            c = docs.get(d, 0)
            if not c:
                continue
            if n < HYPERGEOMETRIC_LIMIT:
                h = int(rng.hypergeometric(k, n - k, c)) if k and k < n else (c if k else 0)
            else:  # past numpy's limit: a binomial, kept within what the inputs still to come leave possible
                h = int(np.clip(rng.binomial(c, k / n), max(0, k - (n - c)), min(c, k)))
            out[d] = h
            n, k = n - c, k - h
    return held
