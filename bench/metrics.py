"""Clustering quality against truth labels, shared by the benchmarks.

- `pairwise(clusters, labels)`: pairwise precision, recall and F1 of a clustering (a pair of
  records counts when both are in one cluster), with no Python loop over pairs;
- `components(n, i, j)`: connected-component label per record over the pairs (i, j).
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def pair_count(sizes: pd.Series) -> int:
    """Pairs inside groups of these sizes."""
    s = sizes.to_numpy(np.int64)
    return int((s * (s - 1) // 2).sum())


def pairwise(clusters: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    frame = pd.DataFrame({"c": clusters, "t": labels})
    tp = pair_count(frame.groupby(["c", "t"]).size())
    predicted, true = pair_count(frame.groupby("c").size()), pair_count(frame.groupby("t").size())
    p = tp / predicted if predicted else 1.0
    r = tp / true if true else 1.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]
