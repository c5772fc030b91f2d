"""Exact-key identity matcher (first version): the same mobile or e-mail means the same customer.

Contract used by the resolve stage (a fuller engine replaces this module without touching the
DAG): `match(records, master)` takes the normalised incoming records and a lookup into the live
master, and returns one `Assignment` per record. Guarantees:
- a record already linked keeps its customer (stable ids across runs and reruns);
- records sharing a valid mobile or a personal (non-generic) e-mail join one cluster, within the
  batch and against existing customers; landlines and role mailboxes (`info@`) never join
  records, because colleagues share them;
- a new cluster's id is a UUID derived from its smallest (source, stream, key), so a rerun of the
  same batch produces the same ids;
- records that would join two different existing customers attach to the one their own link or
  the most keys point to; merging existing customers is left to the full engine.
"""
from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Protocol

NAMESPACE = uuid.UUID("6f1d3c3e-5a0b-4a57-9d0e-43a1c0c8a001")


@dataclass(frozen=True)
class IdentityRecord:
    source: str
    stream: str
    source_pk: str
    full_name: str | None
    name_key: str | None
    phone_e164: str | None
    phone_kind: str | None
    email: str | None
    email_valid: bool
    email_generic: bool

    def keys(self) -> list[str]:
        keys = []
        if self.phone_e164 and self.phone_kind == "mobile":
            keys.append(f"mobile:{self.phone_e164}")
        if self.email and self.email_valid and not self.email_generic:
            keys.append(f"email:{self.email}")
        return keys


@dataclass(frozen=True)
class Assignment:
    customer_id: uuid.UUID
    decision: str          # linked | merged | new
    rule: str
    score: float
    explanation: dict = field(default_factory=dict)


class MasterLookup(Protocol):
    def linked(self, source: str, source_pks: list[str]) -> dict[str, uuid.UUID]: ...
    def by_keys(self, keys: list[str]) -> dict[str, set[uuid.UUID]]: ...


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def new_customer_id(source: str, stream: str, source_pk: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"{source}/{stream}/{source_pk}")


def match(records: list[IdentityRecord], master: MasterLookup) -> list[Assignment]:
    if not records:
        return []
    by_source: dict[str, list[str]] = {}
    for r in records:
        by_source.setdefault(r.source, []).append(r.source_pk)
    linked: dict[tuple[str, str], uuid.UUID] = {}
    for source, pks in by_source.items():
        for pk, cid in master.linked(source, pks).items():
            linked[(source, pk)] = cid

    uf = _UnionFind(len(records))
    first_with_key: dict[str, int] = {}
    for i, r in enumerate(records):
        for key in r.keys():
            if key in first_with_key:
                uf.union(first_with_key[key], i)
            else:
                first_with_key[key] = i
    master_keys = master.by_keys(list(first_with_key))

    clusters: dict[int, list[int]] = {}
    for i in range(len(records)):
        clusters.setdefault(uf.find(i), []).append(i)

    out: list[Assignment | None] = [None] * len(records)
    for members in clusters.values():
        votes: Counter[uuid.UUID] = Counter()
        evidence: dict[uuid.UUID, list[str]] = {}
        for i in members:
            if (records[i].source, records[i].source_pk) in linked:
                votes[linked[(records[i].source, records[i].source_pk)]] += 10
            for key in records[i].keys():
                for cid in master_keys.get(key, ()):
                    votes[cid] += 1
                    evidence.setdefault(cid, []).append(key)
        if votes:
            target = sorted(votes.items(), key=lambda kv: (-kv[1], str(kv[0])))[0][0]
            target_is_new = False
        else:
            first = min(members, key=lambda i: (records[i].source, records[i].stream, records[i].source_pk))
            target = new_customer_id(records[first].source, records[first].stream, records[first].source_pk)
            target_is_new = True
        for i in members:
            r = records[i]
            own = linked.get((r.source, r.source_pk))
            if own is not None:
                out[i] = Assignment(own, "linked", "source_link", 1.0, {"link": "existing (source, source_id)"})
                continue
            shared = sorted(set(r.keys()) & set(evidence.get(target, [])))
            batch_keys = sorted(k for k in r.keys() if any(k in records[j].keys() for j in members if j != i))
            if target_is_new and len(members) == 1:
                out[i] = Assignment(target, "new", "no_match", 0.0, {})
            elif target_is_new and i == min(members, key=lambda j: (records[j].source, records[j].stream, records[j].source_pk)):
                out[i] = Assignment(target, "new", "cluster_seed", 0.0, {"batch_keys": batch_keys})
            else:
                rule = "exact_" + "+".join(sorted({k.split(":", 1)[0] for k in (shared or batch_keys)}) or ["cluster"])
                out[i] = Assignment(target, "merged", rule, 1.0,
                                    {"master_keys": shared, "batch_keys": batch_keys})
    return [a for a in out if a is not None]
