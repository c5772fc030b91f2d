"""Blocking: which record pairs are compared at all.

`candidate_pairs(enc, settings, is_master=None)` returns every pair of records that share the
full value of at least one blocking rule's key (all key parts present). Guarantees:
- pairs are unique, with `i < j` (positions in the frame), sorted, and carry the index of the
  first rule that produced them (for the explanation);
- a key value shared by more than the rule's `max_block_size` records is skipped for that rule
  and counted: a switchboard or `info@` address shared by hundreds of records is no evidence
  and would make the pair count quadratic; other rules still see those records;
- with `is_master`, pairs of two master records are never produced (they were resolved by
  earlier runs), and blocks holding no batch record are dropped before any pair is built, so a
  small batch against a large master costs in proportion to the batch;
- everything is vectorised (sort, group sizes, repeat/cumsum); there is no loop over records.

`pairs_completeness` and `reduction_ratio` measure a blocking against labels (for the bench).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from crm_sync.identity.features import Encoded
from crm_sync.identity.settings import BlockingRule, Settings


@dataclass
class Blocking:
    i: np.ndarray            # int64 positions, i < j
    j: np.ndarray
    rule: np.ndarray         # int16 index of the first rule that produced the pair
    rule_names: list[str]
    pairs_per_rule: dict[str, int] = field(default_factory=dict)
    skipped_blocks: dict[str, int] = field(default_factory=dict)   # oversized key values skipped
    skipped_records: dict[str, int] = field(default_factory=dict)  # records in those blocks

    def __len__(self) -> int:
        return len(self.i)


def _key_codes(enc: Encoded, rule: BlockingRule) -> np.ndarray:
    """One int64 code per record for the rule's composite key; -1 when any part is missing."""
    combined: np.ndarray | None = None
    for part in rule.keys:
        codes = enc.codes[part.column]
        if part.prefix:
            prefixed = pd.Series(enc.uniques[part.column], dtype=object).str[: part.prefix]
            remap, _ = pd.factorize(prefixed, use_na_sentinel=True)
            remap = np.append(remap, -1)  # code -1 stays -1
            codes = remap[codes]
        codes = codes.astype(np.int64)
        if combined is None:
            combined = codes
            continue
        width = int(codes.max()) + 2 if len(codes) else 1
        merged = np.where((combined < 0) | (codes < 0), -1, combined * width + codes)
        # re-factorise so the next part cannot overflow int64
        combined, _ = pd.factorize(merged, use_na_sentinel=False)
        combined = combined.astype(np.int64)
        missing_code = np.flatnonzero(merged < 0)
        if len(missing_code):
            combined[missing_code] = -1
    assert combined is not None
    return combined


def _pairs_in_blocks(order: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All within-block pairs, given blocks as runs [start, start+size) of `order`."""
    if len(sizes) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    # position p in a block of size s at rank r pairs with the s-1-r positions after it
    rank = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    pos = np.repeat(starts, sizes) + rank
    count = np.repeat(sizes, sizes) - 1 - rank
    del rank
    total = int(count.sum())
    left = np.repeat(pos, count)
    # right = left + 1 + offset within the run, built in place: these arrays are the largest of
    # a big run, one element per candidate pair
    right = np.arange(total, dtype=np.int64)
    right -= np.repeat(np.cumsum(count) - count, count)
    right += left
    right += 1
    a = order[left]
    del left
    b = order[right]
    del right
    lo = np.minimum(a, b)
    np.maximum(a, b, out=b)
    return lo, b


def rule_pairs(enc: Encoded, rule: BlockingRule, cap: int,
               is_master: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Pairs for one rule plus (skipped blocks, skipped records)."""
    key = _key_codes(enc, rule)
    idx = np.flatnonzero(key >= 0)
    if len(idx) < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64), 0, 0
    k = key[idx]
    sort = np.argsort(k, kind="stable")
    order, k = idx[sort], k[sort]
    boundaries = np.flatnonzero(np.diff(k)) + 1
    starts = np.concatenate(([0], boundaries))
    sizes = np.diff(np.concatenate((starts, [len(k)])))
    oversized = sizes > cap
    keep = (sizes >= 2) & ~oversized
    if is_master is not None:
        batch_in_block = np.add.reduceat((~is_master[order]).astype(np.int64), starts) > 0
        keep &= batch_in_block
        oversized &= batch_in_block
    i, j = _pairs_in_blocks(order, starts[keep], sizes[keep])
    if is_master is not None:
        fresh = ~(is_master[i] & is_master[j])
        if not fresh.all():
            i, j = i[fresh], j[fresh]
    return i, j, int(oversized.sum()), int(sizes[oversized].sum())


def candidate_pairs(enc: Encoded, settings: Settings, is_master: np.ndarray | None = None) -> Blocking:
    n = enc.n
    n_rules = len(settings.blocking)
    tagged: list[np.ndarray] = []
    result = Blocking(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int16),
                      [r.name for r in settings.blocking])
    for r, rule in enumerate(settings.blocking):
        cap = rule.max_block_size or settings.max_block_size
        i, j, skipped, skipped_records = rule_pairs(enc, rule, cap, is_master)
        result.pairs_per_rule[rule.name] = len(i)
        result.skipped_blocks[rule.name] = skipped
        result.skipped_records[rule.name] = skipped_records
        # (pair, rule) in one int64: sorting puts a pair's first rule first, without an argsort
        key = i
        key *= n
        key += j
        del j
        key *= n_rules
        key += r
        tagged.append(key)
    if not tagged:
        return result
    keys = np.concatenate(tagged) if len(tagged) > 1 else tagged[0]
    del tagged
    keys.sort()
    pair = keys // n_rules
    first = np.empty(len(pair), dtype=bool)
    if len(pair):
        first[0] = True
        np.not_equal(pair[1:], pair[:-1], out=first[1:])
    result.rule = (keys[first] % n_rules).astype(np.int16)
    del keys
    pair = pair[first]
    result.i, result.j = pair // n, pair % n
    return result


def true_pair_count(labels: np.ndarray) -> int:
    sizes = pd.Series(labels).value_counts().to_numpy(dtype=np.int64)
    return int((sizes * (sizes - 1) // 2).sum())


def pairs_completeness(i: np.ndarray, j: np.ndarray, labels: np.ndarray) -> float:
    """Share of the true matching pairs that blocking proposes."""
    total = true_pair_count(labels)
    if total == 0:
        return 1.0
    labels = np.asarray(labels)
    return float((labels[i] == labels[j]).sum() / total)


def reduction_ratio(n_pairs: int, n_records: int) -> float:
    """1 - proposed pairs / all pairs."""
    all_pairs = n_records * (n_records - 1) // 2
    return 1.0 - n_pairs / all_pairs if all_pairs else 0.0
