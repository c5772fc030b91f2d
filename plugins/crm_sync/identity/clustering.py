"""Clustering without chaining: union-find over merge edges that refuses unsafe unions.

`cluster(n, edges, strong, must_link, cannot_link, initial)` joins records along merge-band
edges in descending probability (ties by record position, so the result is deterministic).
Guarantees:
- `initial` groups (the master's existing clusters) and `must_link` pairs (a steward said
  "same") are joined first, unconditionally;
- an edge is refused when the two clusters would then hold conflicting strong identifiers —
  for some strong field both clusters have values and the two value sets are disjoint (two
  different mobiles, two different personal e-mails, two different full-name readings; weak
  values such as a landline, a role mailbox or a surname-only name are not strong values) — or
  when a cannot-link pair would end up inside one cluster. So a weak record ("王先生" with only a
  switchboard) can join one person but never glue two different people together;
- two values of a strong field that a merge edge compares on an agreeing level (a level that
  weighs for a match: same reading, a fuzzy name level, a mobile one digit off) are one value
  for that check, so a keying error never splits a person; values that only ever meet on a
  disagreeing level still conflict;
- refused edges are returned with the reason, for the review queue;
- when a union joins clusters that each contain existing cluster ids, the event is recorded
  with the edge that caused it (for `cluster_merges`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pandas as pd


@dataclass
class ClusterResult:
    root: np.ndarray                                   # cluster representative per record
    refused: list[tuple[int, str]] = field(default_factory=list)      # (edge index, reason)
    joins: list[tuple[frozenset, frozenset, int]] = field(default_factory=list)  # existing ids A, B, edge (-1 = must-link)
    must_link_conflicts: int = 0


class _Forest:
    def __init__(self, n: int, strong: list[np.ndarray], existing: list[str | None] | None) -> None:
        self.parent = np.arange(n, dtype=np.int64)
        self.size = np.ones(n, dtype=np.int64)
        self.strong = strong
        self.values: dict[int, list[set[int]]] = {}
        self.partners: dict[int, set[int]] = {}
        self.ids: dict[int, frozenset] = {}
        self.existing = existing

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return int(root)

    def strong_sets(self, root: int) -> list[set[int]]:
        sets = self.values.get(root)
        if sets is None:
            # a singleton's own values; larger clusters always have an entry
            sets = [{int(s[root])} if s[root] >= 0 else set() for s in self.strong]
        return sets

    def ids_of(self, root: int) -> frozenset:
        found = self.ids.get(root)
        if found is not None:
            return found
        if self.existing is not None and self.existing[root] is not None:
            return frozenset([self.existing[root]])
        return frozenset()

    def conflict(self, ra: int, rb: int, field_names: list[str]) -> str | None:
        # partners are registered on both sides, so looking from one cluster suffices
        for p in self.partners.get(ra, ()):
            if self.find(p) == rb:
                return "cannot_link"
        for f, (va, vb) in enumerate(zip(self.strong_sets(ra), self.strong_sets(rb))):
            if va and vb and va.isdisjoint(vb):
                return f"strong:{field_names[f]}"
        return None

    def union(self, ra: int, rb: int) -> int:
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        sets = [a | b for a, b in zip(self.strong_sets(ra), self.strong_sets(rb))]
        ids = self.ids_of(ra) | self.ids_of(rb)
        partners = self.partners.pop(rb, set()) | self.partners.get(ra, set())
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        self.values[ra] = sets
        self.values.pop(rb, None)
        if ids:
            self.ids[ra] = ids
        self.ids.pop(rb, None)
        if partners:
            self.partners[ra] = partners
        return ra


def cluster(n: int, edge_i: np.ndarray, edge_j: np.ndarray, edge_p: np.ndarray,
            strong: list[np.ndarray], strong_names: list[str], *,
            must_link: Iterable[tuple[int, int]] = (), cannot_link: Iterable[tuple[int, int]] = (),
            initial: np.ndarray | None = None, existing: list[str | None] | np.ndarray | None = None,
            agrees: np.ndarray | None = None) -> ClusterResult:
    """Cluster n records. `strong[f][r]` is record r's strong value code for field f (-1: none).

    `agrees[e, f]` (optional) says that merge edge e's two values of strong field f agree
    although they differ (a fuzzy or one-typo level that weighs for a match): such values count
    as one value, so a typo never splits a person, while two values that only ever meet on
    disagreeing levels still conflict.

    `initial[r]` is a group code (-1: none) for records that start joined; `existing[r]` is the
    record's existing cluster id (master rows) or None.

    Most components of the merge graph cannot chain at all: every strong field has at most one
    value in the whole component, no cannot-link pair lies inside it and at most one existing
    cluster id. Such components are found with vectorised connected components and taken as
    they are — best-first union-find would accept every one of their edges. Only the rest goes
    through the best-first union-find, component by component, which gives the same result as
    running it on the whole graph (components do not interact).
    """
    edge_i = np.asarray(edge_i, dtype=np.int64)
    edge_j = np.asarray(edge_j, dtype=np.int64)
    edge_p = np.asarray(edge_p, dtype=np.float64)
    if agrees is not None and len(edge_i):
        strong = [_same_value_through_agreement(codes, edge_i, edge_j, agrees[:, f])
                  for f, codes in enumerate(strong)]
    must_link, cannot_link = list(must_link), list(cannot_link)
    existing_arr = None if existing is None else np.asarray(existing, dtype=object)
    comp = _components(n, edge_i, edge_j, must_link, initial)
    careful = np.zeros(comp.max() + 1 if n else 0, dtype=bool)
    # only components of two or more records can hold two values
    shared = np.flatnonzero(np.bincount(comp, minlength=len(careful))[comp] > 1)
    for codes in strong:
        careful |= _more_than_one(comp[shared], codes[shared], len(careful))
    if existing_arr is not None and len(shared):
        ids, _ = pd.factorize(pd.Series(existing_arr[shared], dtype=object), use_na_sentinel=True)
        careful |= _more_than_one(comp[shared], ids, len(careful))
    for a, b in cannot_link:
        if comp[a] == comp[b]:
            careful[comp[a]] = True
    # the representative of a component is its smallest position
    first = np.full(len(careful), n, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n, dtype=np.int64))
    root = first[comp]
    result = ClusterResult(root=root)
    if not careful.any():
        return result
    members = np.flatnonzero(careful[comp])
    local = np.full(n, -1, dtype=np.int64)
    local[members] = np.arange(len(members))
    inside = (local[edge_i] >= 0)  # an edge lies in one component: both ends are careful or neither
    edges = np.flatnonzero(inside)
    sub = _cluster_best_first(
        len(members), local[edge_i[edges]], local[edge_j[edges]], edge_p[edges],
        [codes[members] for codes in strong], strong_names,
        must_link=[(local[a], local[b]) for a, b in must_link if local[a] >= 0],
        cannot_link=[(local[a], local[b]) for a, b in cannot_link if local[a] >= 0 and local[b] >= 0],
        initial=None if initial is None else initial[members],
        existing=None if existing_arr is None else list(existing_arr[members]))
    root[members] = members[sub.root]
    result.refused = [(int(edges[e]), reason) for e, reason in sub.refused]
    result.joins = [(a, b, int(edges[e]) if e >= 0 else -1) for a, b, e in sub.joins]
    result.must_link_conflicts = sub.must_link_conflicts
    return result


def _same_value_through_agreement(codes: np.ndarray, edge_i: np.ndarray, edge_j: np.ndarray,
                                  agree: np.ndarray) -> np.ndarray:
    """Codes with values joined where an agreeing edge links two different values."""
    ca, cb = codes[edge_i], codes[edge_j]
    link = agree & (ca >= 0) & (cb >= 0) & (ca != cb)
    if not link.any():
        return codes
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    width = int(codes.max()) + 1
    graph = coo_matrix((np.ones(int(link.sum()), dtype=np.int8), (ca[link], cb[link])), shape=(width, width))
    _, canonical = connected_components(graph, directed=False)
    return np.where(codes >= 0, canonical[np.maximum(codes, 0)], -1).astype(codes.dtype, copy=False)


def _components(n: int, edge_i: np.ndarray, edge_j: np.ndarray, must_link: list[tuple[int, int]],
                initial: np.ndarray | None) -> np.ndarray:
    """Connected component label per record over merge edges, must-links and initial groups."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows, cols = [edge_i], [edge_j]
    if must_link:
        ml = np.asarray(must_link, dtype=np.int64)
        rows.append(ml[:, 0])
        cols.append(ml[:, 1])
    if initial is not None and len(initial):
        grouped = np.flatnonzero(initial >= 0)
        order = grouped[np.argsort(initial[grouped], kind="stable")]
        codes = initial[order]
        same = codes[1:] == codes[:-1]
        rows.append(order[:-1][same])
        cols.append(order[1:][same])
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64, copy=False)


def _more_than_one(comp: np.ndarray, codes: np.ndarray, n_components: int) -> np.ndarray:
    """Per component: does it hold two or more distinct values (code >= 0)?"""
    has = codes >= 0
    if not has.any():
        return np.zeros(n_components, dtype=bool)
    values = codes[has].astype(np.int64)
    width = int(values.max()) + 1
    keys = comp[has] * width + values
    keys.sort()
    distinct = keys[np.r_[True, keys[1:] != keys[:-1]]] // width
    return np.bincount(distinct, minlength=n_components) > 1


def _cluster_best_first(n: int, edge_i: np.ndarray, edge_j: np.ndarray, edge_p: np.ndarray,
                        strong: list[np.ndarray], strong_names: list[str], *,
                        must_link: Iterable[tuple[int, int]] = (), cannot_link: Iterable[tuple[int, int]] = (),
                        initial: np.ndarray | None = None, existing: list[str | None] | None = None
                        ) -> ClusterResult:
    """Best-first union-find that refuses unsafe unions (the module docstring's guarantees)."""
    forest = _Forest(n, strong, existing)
    result = ClusterResult(root=np.empty(0, np.int64))
    if initial is not None and len(initial):
        members = np.flatnonzero(initial >= 0)
        order = members[np.argsort(initial[members], kind="stable")]
        codes = initial[order]
        first = np.r_[True, codes[1:] != codes[:-1]]
        heads = order[np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))]
        for r, head in zip(order[~first].tolist(), heads[~first].tolist()):
            ra, rb = forest.find(head), forest.find(r)
            if ra != rb:
                forest.union(ra, rb)
    for a, b in cannot_link:
        forest.partners.setdefault(forest.find(a), set()).add(b)
        forest.partners.setdefault(forest.find(b), set()).add(a)
    for a, b in must_link:
        ra, rb = forest.find(a), forest.find(b)
        if ra == rb:
            continue
        if forest.conflict(ra, rb, strong_names) == "cannot_link":
            result.must_link_conflicts += 1
            continue
        ids_a, ids_b = forest.ids_of(ra), forest.ids_of(rb)
        forest.union(ra, rb)
        if ids_a and ids_b:
            result.joins.append((ids_a, ids_b, -1))
    order = np.lexsort((edge_j, edge_i, -edge_p))
    for e in order.tolist():
        ra, rb = forest.find(int(edge_i[e])), forest.find(int(edge_j[e]))
        if ra == rb:
            continue
        reason = forest.conflict(ra, rb, strong_names)
        if reason is not None:
            result.refused.append((e, reason))
            continue
        ids_a, ids_b = forest.ids_of(ra), forest.ids_of(rb)
        forest.union(ra, rb)
        if ids_a and ids_b:
            result.joins.append((ids_a, ids_b, e))
    parent = forest.parent
    # full path compression, vectorised: iterate pointer jumping until stable
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            break
        parent = grand
    result.root = parent
    return result
