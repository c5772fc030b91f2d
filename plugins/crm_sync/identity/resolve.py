"""Resolve stage: normalise identity evidence and assign a customer id to every customer record.

Reads the run's `stg.extracted` rows of the source's customer streams, normalises name, phone and
e-mail once per distinct value, asks the matcher for a customer id, and writes `stg.resolved`.
Nothing in the master changes here: ids become real only when the load commits.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from crm_sync import runlog, staging
from crm_sync.config import SourceConfig, StreamConfig
from crm_sync.identity import matcher, normalize


@dataclass(frozen=True)
class ResolveResult:
    records: int
    linked: int
    merged: int
    new: int
    review: int = 0


class PostgresMaster:
    """The live master as the matcher sees it (follows `merged_into` to the survivor)."""

    def __init__(self, cur) -> None:
        self.cur = cur

    def linked(self, source: str, source_pks: list[str]) -> dict[str, uuid.UUID]:
        self.cur.execute(
            """select l.source_id, coalesce(c.merged_into, c.customer_id)
               from crm.customer_link l join crm.customer c using (customer_id)
               where l.source = %s and l.source_id = any(%s)""",
            (source, source_pks),
        )
        return {pk: uuid.UUID(str(cid)) for pk, cid in self.cur.fetchall()}

    def by_keys(self, keys: list[str]) -> dict[str, set[uuid.UUID]]:
        mobiles = [k.split(":", 1)[1] for k in keys if k.startswith("mobile:")]
        emails = [k.split(":", 1)[1] for k in keys if k.startswith("email:")]
        found: dict[str, set[uuid.UUID]] = {}
        self.cur.execute(
            """select 'mobile:' || s.phone_e164, coalesce(c.merged_into, c.customer_id)
               from crm.source_customer s join crm.customer c using (customer_id)
               where s.phone_kind = 'mobile' and s.phone_e164 = any(%s)
               union
               select 'email:' || s.email, coalesce(c.merged_into, c.customer_id)
               from crm.source_customer s join crm.customer c using (customer_id)
               where s.email = any(%s)""",
            (mobiles, emails),
        )
        for key, cid in self.cur.fetchall():
            found.setdefault(key, set()).add(uuid.UUID(str(cid)))
        return found


def _first_phone(payload: dict, fields: list[str]) -> tuple[str | None, normalize.Phone | None]:
    """The best phone among the configured fields: a mobile beats a landline beats invalid."""
    best: tuple[int, str | None, normalize.Phone | None] = (99, None, None)
    rank = {"mobile": 0, "landline": 1, "other": 2, "invalid": 3}
    for name in fields:
        raw = payload.get(name)
        if raw is None or str(raw).strip() == "":
            continue
        phone = normalize.normalize_phone(str(raw), city=payload.get("city"))
        r = rank.get(phone.kind, 4)
        if r < best[0]:
            best = (r, str(raw), phone)
    return best[1], best[2]


def identity_record(cfg: SourceConfig, stream: StreamConfig, source_pk: str, payload: dict):
    keys = stream.identity
    name = normalize.normalize_person_name(payload.get(keys.name) if keys.name else None)
    phone_raw, phone = _first_phone(payload, keys.phones)
    email = normalize.normalize_email(payload.get(keys.email) if keys.email else None)
    record = matcher.IdentityRecord(
        source=cfg.source, stream=stream.name, source_pk=source_pk,
        full_name=name.full or None, name_key=name.pinyin or None,
        phone_e164=phone.e164 if phone else None, phone_kind=phone.kind if phone else "empty",
        email=email.email, email_valid=email.valid, email_generic=email.generic,
    )
    extras = {
        "phone_raw": phone_raw,
        "phone_ext": phone.extension if phone else None,
        # keep what the source said when it does not parse, so validation can see and reject it
        "email_text": email.email if email.email else (normalize.nfkc(email.raw) or None),
    }
    return record, extras


def resolve(conn, run_id: str, cfg: SourceConfig) -> ResolveResult:
    streams = [s for s in cfg.streams if s.entity == "customer"]
    records: list[matcher.IdentityRecord] = []
    extras: list[dict] = []
    with conn.cursor() as cur:
        for stream in streams:
            cur.execute(
                "select source_pk, payload from stg.extracted where run_id = %s and source = %s and stream = %s"
                " order by source_pk",
                (run_id, cfg.source, stream.name),
            )
            for source_pk, payload in cur.fetchall():
                record, extra = identity_record(cfg, stream, source_pk, payload)
                records.append(record)
                extras.append(extra)
        assignments = matcher.match(records, PostgresMaster(cur))
        for stream in streams:
            staging.delete_run(cur, "stg.resolved", run_id, cfg.source, stream.name)
        staging.copy_rows(
            cur, "stg.resolved",
            ["run_id", "source", "stream", "source_pk", "customer_id", "decision", "match_rule", "match_score",
             "explanation", "full_name", "name_key", "phone_raw", "phone_e164", "phone_kind", "phone_ext",
             "email", "email_valid"],
            ((run_id, r.source, r.stream, r.source_pk, str(a.customer_id), a.decision, a.rule, a.score,
              json.dumps(a.explanation, ensure_ascii=False), r.full_name, r.name_key, x["phone_raw"],
              r.phone_e164, r.phone_kind, x["phone_ext"], x["email_text"], r.email_valid)
             for r, a, x in zip(records, assignments, extras)),
        )
        counts = {d: sum(1 for a in assignments if a.decision == d) for d in ("linked", "merged", "new")}
        new_customers = len({a.customer_id for a in assignments if a.decision == "new"})
        runlog.update(cur, run_id, cfg.source, ids_linked=counts["linked"], ids_merged=counts["merged"],
                      ids_new=new_customers, ids_review=0)
    return ResolveResult(records=len(records), linked=counts["linked"], merged=counts["merged"],
                         new=new_customers)
