"""Map stage: source payloads into the CRM model, with the casts and value maps of the YAML.

Guarantees: a value that cannot be cast, a required field that is missing, a money value with
more decimals than its scale allows, or an order/ticket that points at an unknown customer is
quarantined with the stream, record, field and reason — the rest of the batch goes on.
Money is parsed from its text form into `Decimal`, never through float.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation

from crm_sync import quarantine, staging
from crm_sync.config import FieldMap, SourceConfig, StreamConfig
from crm_sync.staging import to_json

ENTITY_TABLE = {"customer": "stg.mapped_customer", "order": "stg.mapped_order", "ticket": "stg.mapped_ticket"}
ENTITY_COLUMNS = {
    "customer": ["customer_id", "full_name", "name_key", "phone_raw", "phone_e164", "phone_kind", "phone_ext",
                 "email", "company", "city", "source_created_at", "source_updated_at"],
    "order": ["source_customer_id", "order_date", "amount", "currency", "status", "source_updated_at"],
    "ticket": ["source_customer_id", "subject", "status", "priority", "source_created_at", "source_updated_at"],
}
# identity columns come from the resolve stage, already normalised
RESOLVED_COLUMNS = ["customer_id", "full_name", "name_key", "phone_raw", "phone_e164", "phone_kind",
                    "phone_ext", "email"]


class CastError(ValueError):
    pass


@dataclass(frozen=True)
class MapResult:
    mapped: int
    rejected: int


def cast(value, fm: FieldMap):
    """Cast one payload value as the field map says; raise CastError with a readable reason."""
    if isinstance(value, str):
        value = value.strip()
        if value == "":
            value = None
    if value is not None and fm.values is not None:
        key = str(value)
        if key not in fm.values:
            raise CastError(f"value {value!r} is not one of the mapped values {sorted(fm.values)}")
        value = fm.values[key]
    if value is None:
        if fm.required:
            raise CastError(f"required field {fm.from_!r} is missing")
        return None
    try:
        if fm.type == "text":
            return str(value)
        if fm.type == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise CastError(f"{value!r} is not a whole number")
            return int(str(value))
        if fm.type == "numeric":
            if isinstance(value, float):
                raise CastError(f"{value!r} arrived as a binary float; money must come as text or decimal")
            number = Decimal(str(value).replace(",", ""))
            if not number.is_finite():
                raise CastError(f"{value!r} is not a finite number")
            if fm.scale is not None and -number.as_tuple().exponent > fm.scale:
                raise CastError(f"{value!r} has more than {fm.scale} decimal places")
            return number
        if fm.type == "date":
            if isinstance(value, date):
                return value
            return date.fromisoformat(str(value)[:10]) if len(str(value)) >= 10 else date.fromisoformat(str(value))
        if fm.type == "timestamptz":
            if isinstance(value, datetime):
                parsed = value
            else:
                parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                raise CastError(f"{value!r} has no time zone")
            return parsed
        if fm.type == "bool":
            text = str(value).lower()
            if text in ("true", "t", "1", "yes", "y"):
                return True
            if text in ("false", "f", "0", "no", "n"):
                return False
            raise CastError(f"{value!r} is not a boolean")
    except CastError:
        raise
    except (ValueError, InvalidOperation, TypeError) as exc:
        raise CastError(f"cannot cast {value!r} to {fm.type}: {exc}") from None
    raise CastError(f"unknown type {fm.type}")


def row_hash(values: dict) -> str:
    return hashlib.sha256(to_json(values).encode()).hexdigest()[:32]


def map_stream(conn, run_id: str, cfg: SourceConfig, stream: StreamConfig) -> MapResult:
    entity = stream.entity
    table = ENTITY_TABLE[entity]
    columns = ENTITY_COLUMNS[entity]
    rejects: list[quarantine.Reject] = []
    out_rows: list[list] = []
    with conn.cursor() as cur:
        if entity == "customer":
            cur.execute(
                f"""select e.source_pk, e.payload, {", ".join("r." + c for c in RESOLVED_COLUMNS)}
                    from stg.extracted e join stg.resolved r using (run_id, source, stream, source_pk)
                    where e.run_id = %s and e.source = %s and e.stream = %s order by e.source_pk""",
                (run_id, cfg.source, stream.name),
            )
        else:
            cur.execute(
                "select source_pk, payload from stg.extracted where run_id = %s and source = %s and stream = %s"
                " order by source_pk",
                (run_id, cfg.source, stream.name),
            )
        rows = cur.fetchall()
        known_customers: set[str] = set()
        if entity != "customer":
            refs = sorted({str(p.get(stream.mapping["source_customer_id"].from_)) for _, p, *rest in rows
                           if p.get(stream.mapping["source_customer_id"].from_) is not None})
            cur.execute("select source_id from crm.customer_link where source = %s and source_id = any(%s)"
                        " union select source_pk from stg.resolved where run_id = %s and source = %s and source_pk = any(%s)",
                        (cfg.source, refs, run_id, cfg.source, refs))
            known_customers = {r[0] for r in cur.fetchall()}
        for source_pk, payload, *resolved in rows:
            values: dict = {}
            failed = False
            for target, fm in stream.mapping.items():
                try:
                    values[target] = cast(payload.get(fm.from_), fm)
                except CastError as exc:
                    rejects.append(quarantine.Reject(stream.name, source_pk, "map", target,
                                                     f"{fm.from_}: {exc}", payload))
                    failed = True
            if failed:
                continue
            if entity == "customer":
                values.update(dict(zip(RESOLVED_COLUMNS, resolved)))
                values["customer_id"] = str(values["customer_id"])
            elif values.get("source_customer_id") not in known_customers:
                rejects.append(quarantine.Reject(
                    stream.name, source_pk, "map", "source_customer_id",
                    f"unknown customer reference {values.get('source_customer_id')!r}: no such customer in "
                    f"{cfg.source} (not linked before and not in this run)", payload))
                continue
            record = [values.get(c) for c in columns]
            hashed = {c: v for c, v in zip(columns, record) if c != "customer_id"}
            out_rows.append([run_id, cfg.source, stream.name, source_pk, *record, row_hash(hashed)])
        staging.delete_run(cur, table, run_id, cfg.source, stream.name)
        quarantine.clear(cur, run_id, cfg.source, stream.name, stage="map")
        written = staging.copy_rows(cur, table, ["run_id", "source", "stream", "source_pk", *columns, "row_hash"],
                                    out_rows)
        quarantine.add(cur, run_id, cfg.source, rejects)
    return MapResult(mapped=written, rejected=len(rejects))
