"""Map stage: source payloads into the CRM model, with the casts and value maps of the YAML.

Guarantees: a value that cannot be cast, a required field that is missing, a text with a NUL
character or longer than its `max_length`, or a money value with more decimals than its scale
allows is quarantined with the stream, record, field and reason — the rest of the batch goes on.
Money is parsed from every text form the sources use (`crm_sync.money`) into `Decimal`, never
through float, and quantized to the entity's declared scale. Whether a fact's customer exists is
the load's question (held orphans, see `crm_sync.orphans`), not the map's.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation

from crm_sync import entities, quarantine, staging
from crm_sync.config import FieldMap, SourceConfig, StreamConfig
from crm_sync.staging import to_json

# customer rows carry the resolve stage's identity columns before the mapped ones
CUSTOMER_COLUMNS = ["customer_id", "full_name", "name_key", "phone_raw", "phone_e164", "phone_kind", "phone_ext",
                    "email", "company", "city", "source_created_at", "source_updated_at"]


def staging_columns(entity: str) -> list[str]:
    """Columns of `stg.mapped_<entity>` between the run keys and `row_hash`."""
    return CUSTOMER_COLUMNS if entity == "customer" else list(entities.get(entity).columns)

# identity columns come from the resolve stage, already normalised
RESOLVED_COLUMNS = ["customer_id", "full_name", "name_key", "phone_raw", "phone_e164", "phone_kind",
                    "phone_ext", "email"]


class CastError(ValueError):
    pass


@dataclass(frozen=True)
class MapResult:
    mapped: int
    rejected: int


def source_value(payload: dict, fm: FieldMap):
    """The raw value a field map reads from a payload (`from`, `pick` by another field, or a constant)."""
    if isinstance(fm.from_, str):
        return payload.get(fm.from_)
    if fm.from_ is not None:
        return next((v for v in map(payload.get, fm.from_) if v is not None and str(v).strip() != ""), None)
    if fm.pick is not None:
        chosen = fm.pick.cases.get(str(payload.get(fm.pick.field)))
        if chosen is None:
            raise CastError(f"{fm.pick.field} is {payload.get(fm.pick.field)!r}, none of {sorted(fm.pick.cases)}")
        return payload.get(chosen)
    return fm.value


def cast(value, fm: FieldMap):
    """Cast one payload value as the field map says; raise CastError with a readable reason."""
    if isinstance(value, str):
        if "\x00" in value:
            raise CastError("contains a NUL character, which no PostgreSQL text can hold")
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
            raise CastError(f"required field {fm.label!r} is missing")
        return None
    try:
        if fm.type == "text":
            if isinstance(value, (dict, list)):
                raise CastError(f"expected text, got a JSON {type(value).__name__}")
            text = str(value)
            if fm.max_length is not None and len(text) > fm.max_length:
                raise CastError(f"is {len(text)} characters long, more than the {fm.max_length} allowed")
            return text
        if fm.type == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise CastError(f"{value!r} is not a whole number")
            return int(value) if isinstance(value, float) else int(str(value))
        if fm.type == "money":
            from crm_sync.money import MoneyError, parse_money

            try:
                return parse_money(value, decimal_comma=fm.decimal_comma, scale=fm.scale)
            except MoneyError as exc:
                raise CastError(str(exc)) from None
        if fm.type == "numeric":
            if isinstance(value, float):
                raise CastError(f"{value!r} arrived as a binary float; money must come as text or decimal")
            number = Decimal(str(value).replace(",", ""))
            if not number.is_finite():
                raise CastError(f"{value!r} is not a finite number")
            if fm.scale is not None and -number.as_tuple().exponent > fm.scale:
                raise CastError(f"{value!r} has more than {fm.scale} decimal places")
            return number
        if fm.type == "phone":
            from crm_sync.identity.normalize import normalize_phone

            phone = normalize_phone(str(value))
            if phone.e164 is None:
                raise CastError(f"{value!r} is not a phone number ({phone.kind})")
            return phone.e164 + (f";ext={phone.extension}" if phone.extension else "")
        if fm.type == "json":
            if isinstance(value, (dict, list)):
                return value
            raise CastError(f"expected a JSON list or object, got {type(value).__name__}")
        if fm.type == "date":
            if isinstance(value, datetime):
                return value.date()
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


def _money_scale(entity: str, fm: FieldMap, target: str) -> FieldMap:
    """Money columns are cast to the entity's declared scale unless the YAML is stricter."""
    scale = entities.get(entity).money.get(target)
    if scale is None or fm.type not in ("money", "numeric") or fm.scale is not None:
        return fm
    return fm.model_copy(update={"scale": scale})


def map_stream(conn, run_id: str, cfg: SourceConfig, stream: StreamConfig) -> MapResult:
    entity = stream.entity
    spec = entities.get(entity)
    table = spec.staging
    columns = staging_columns(entity)
    field_maps = {target: _money_scale(entity, fm, target) for target, fm in stream.mapping.items()}
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
        for source_pk, payload, *resolved in rows:
            values: dict = {}
            failed = False
            for target, fm in field_maps.items():
                try:
                    values[target] = cast(source_value(payload, fm), fm)
                except CastError as exc:
                    rejects.append(quarantine.Reject(stream.name, source_pk, "map", target,
                                                     f"{fm.label}: {exc}", payload))
                    failed = True
            if failed:
                continue
            if entity == "customer":
                # the normalised identity values win; a name the identity fields lack keeps the mapped one
                values.update({c: v for c, v in zip(RESOLVED_COLUMNS, resolved)
                               if v is not None or c != "full_name"})
                values["customer_id"] = str(values["customer_id"])
            record = [values.get(c) for c in columns]
            hashed = {c: v for c, v in zip(columns, record) if c != "customer_id"}
            out_rows.append([run_id, cfg.source, stream.name, source_pk, *record, row_hash(hashed)])
        staging.delete_run(cur, table, run_id, cfg.source, stream.name)
        quarantine.clear(cur, run_id, cfg.source, stream.name, stage="map")
        written = staging.copy_rows(cur, table, ["run_id", "source", "stream", "source_pk", *columns, "row_hash"],
                                    out_rows)
        quarantine.add(cur, run_id, cfg.source, rejects)
        staging.analyze(cur, table)
    return MapResult(mapped=written, rejected=len(rejects))
