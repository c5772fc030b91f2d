"""Map stage: source payloads into the CRM model, with the casts and value maps of the YAML.

Guarantees: a value that cannot be cast, a required field that is missing, a value of the wrong
shape for its declared type (an object or list where text, a number, a date or a phone is
expected, a boolean where a number is), a text with a NUL character, longer than its `max_length`
or longer than 10,000 characters, a number too large for its column, or a money value with more
decimals than its scale allows is quarantined — the reason names the source, stream, record key and
field, and what arrived — and the rest of the batch goes on. Nothing is stored as a Python repr.
A customer record whose identity fields (name, phones, e-mail, company, city) hold an object, a
list or a boolean is quarantined here too, naming the field.
A fact's customer reference (`source_customer_id`, unless it is a phone) and other id-like fields
are record keys in canonical form (`keys.canonical_key`): `1` and `1.0` refer to one customer.
Money is parsed from every text form the sources use (`crm_sync.money`) into `Decimal`, never
through float, and quantized to the entity's declared scale. Whether a fact's customer exists is
the load's question (held orphans, see `crm_sync.orphans`), not the map's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation

from crm_sync import entities, mapsql, quarantine, staging
from crm_sync.config import FieldMap, IdentityKeys, SourceConfig, StreamConfig

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
    in_sql: int = 0  # of `mapped`, the records the set-based path mapped (`mapsql`)


def source_value(payload: dict, fm: FieldMap):
    """The raw value a field map reads from a payload (`from`, `pick` by another field, or a constant)."""
    if isinstance(fm.from_, str):
        return payload.get(fm.from_)
    if fm.from_ is not None:
        return next((v for v in map(payload.get, fm.from_) if v is not None and str(v).strip() != ""), None)
    if fm.pick is not None:
        by = payload.get(fm.pick.field)
        chosen = fm.pick.cases.get(str(by)) if isinstance(by, str) else None
        if chosen is None:
            what = repr(by) if by is None or isinstance(by, str) else shape(by)
            raise CastError(f"{fm.pick.field} is {what}, none of {sorted(fm.pick.cases)}")
        return payload.get(chosen)
    return fm.value


MAX_TEXT = mapsql.MAX_TEXT  # 10,000 characters: longer is never a CRM value, with or without a `max_length`

# what each declared type expects, as an error text says it
_EXPECTED = {"text": "text", "int": "a whole number", "numeric": "a number", "money": "a money amount",
             "date": "a date", "timestamptz": "a timestamp", "phone": "a phone number", "bool": "a boolean",
             "json": "a JSON list or object"}
# the Python shapes (of a JSON payload, or of a database row) each declared type can be cast from
_ACCEPTS: dict[str, tuple[type, ...]] = {
    "text": (str, int, float, Decimal),
    "int": (str, int, float, Decimal),
    "numeric": (str, int, float, Decimal),
    "money": (str, int, float, Decimal),
    "date": (str, date),
    "timestamptz": (str, datetime),
    "phone": (str, int),
    "bool": (str, int, bool),
    "json": (dict, list),
}


def shape(value) -> str:
    """What arrived, in the words of an error text: 'a JSON object', 'a boolean (true)', 'a number (1.5)', …"""
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, (list, tuple)):
        return "a JSON list"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, (int, float, Decimal)):
        return f"a number ({value})"
    if isinstance(value, str):
        return "text" if len(value) > 40 else f"text {value!r}"
    if isinstance(value, datetime):
        return "a timestamp"
    if isinstance(value, date):
        return "a date"
    return f"a {type(value).__name__}"


def _check_shape(value, kind: str) -> None:
    accepts = _ACCEPTS.get(kind, ())
    # bool is an int to Python, never a number or a text to a CRM
    if not isinstance(value, accepts) or (isinstance(value, bool) and bool not in accepts):
        raise CastError(f"expected {_EXPECTED.get(kind, kind)}, got {shape(value)}")


def _value_key(value) -> str:
    """The text a `values:` map is looked up with (JSON spelling for booleans, `1` for `1.0`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def is_key_field(target: str) -> bool:
    """A mapped column that refers to a record of a source by its key (`source_customer_id`, `invoice_ref`)."""
    return target == "source_customer_id" or target.endswith(("_id", "_ref", "_no"))


def cast(value, fm: FieldMap, *, key: bool = False):
    """Cast one payload value as the field map says; raise CastError with a readable reason.

    A value of the wrong shape for the declared type (an object where text is expected, a boolean
    where a number is) is refused naming what arrived, never turned into its Python text. With
    `key`, a text value is a record key and takes its canonical form (`keys.canonical_key`), so
    `1`, `1.0` and `" 1"` refer to one record.
    """
    if isinstance(value, str):
        if "\x00" in value:
            raise CastError("contains a NUL character, which no PostgreSQL text can hold")
        value = value.strip()
        if value == "":
            value = None
        elif len(value) > MAX_TEXT and (fm.max_length is None or fm.type != "text"):
            raise CastError(f"field {fm.label!r} is {len(value)} characters long, more than the {MAX_TEXT} "
                            "characters any text value may have")
    if value is not None and fm.values is not None:
        if isinstance(value, (dict, list, tuple)):
            raise CastError(f"expected one of the mapped values {sorted(fm.values)}, got {shape(value)}")
        mapped = fm.values.get(_value_key(value))
        if mapped is None:
            raise CastError(f"value {_value_key(value)!r} is not one of the mapped values {sorted(fm.values)}")
        value = mapped
    if value is None:
        if fm.required:
            raise CastError(f"required field {fm.label!r} is missing")
        return None
    if fm.type not in _ACCEPTS:
        raise CastError(f"unknown type {fm.type}")
    _check_shape(value, fm.type)
    try:
        if fm.type == "text":
            if key:
                from crm_sync.keys import KeyError_, canonical_key

                try:
                    text = canonical_key(value)
                except KeyError_ as exc:
                    raise CastError(f"not a usable record key: {exc}") from None
            else:
                text = str(value)
            if fm.max_length is not None and len(text) > fm.max_length:
                raise CastError(f"field {fm.label!r} is {len(text)} characters long, more than the "
                                f"{fm.max_length} allowed")
            return text
        if fm.type == "int":
            if isinstance(value, str):
                number = Decimal(value)
                if not number.is_finite() or number != number.to_integral_value():
                    raise CastError(f"{value!r} is not a whole number")
                value = int(number)
            if isinstance(value, float) and not value.is_integer():
                raise CastError(f"{value!r} is not a whole number")
            if isinstance(value, Decimal) and (not value.is_finite() or value != value.to_integral_value()):
                raise CastError(f"{value} is not a whole number")
            number = int(value)
            if not -2**31 <= number < 2**31:
                raise CastError(f"{number} is out of the range of an integer column")
            return number
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
            return value
        if fm.type == "date":
            if isinstance(value, datetime):
                return value.date()
            if isinstance(value, date):
                return value
            return date.fromisoformat(value[:10]) if len(value) >= 10 else date.fromisoformat(value)
        if fm.type == "timestamptz":
            parsed = value if isinstance(value, datetime) else datetime.fromisoformat(value.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                raise CastError(f"{value!r} has no time zone")
            return parsed
        if fm.type == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("true", "t", "1", "yes", "y"):
                return True
            if text in ("false", "f", "0", "no", "n"):
                return False
            raise CastError(f"{value!r} is not a boolean")
    except CastError:
        raise
    except (ValueError, InvalidOperation, TypeError, OverflowError) as exc:
        raise CastError(f"cannot cast {value!r} to {fm.type}: {exc}") from None
    raise CastError(f"unknown type {fm.type}")


def _money_scale(entity: str, fm: FieldMap, target: str) -> FieldMap:
    """Money columns are cast to the entity's declared scale unless the YAML is stricter."""
    scale = entities.get(entity).money.get(target)
    if scale is None or fm.type not in ("money", "numeric") or fm.scale is not None:
        return fm
    return fm.model_copy(update={"scale": scale})


def _numeric_limits(entity: str) -> dict[str, tuple[int, int]]:
    """(precision, scale) of the entity's `numeric(p,s)` columns: a larger value would fail the whole COPY."""
    limits = {}
    for column, kind in entities.get(entity).columns.items():
        match = re.fullmatch(r"numeric\((\d+),\s*(\d+)\)", kind)
        if match:
            limits[column] = (int(match.group(1)), int(match.group(2)))
    return limits


def _fits(value, limit: tuple[int, int] | None) -> None:
    if limit is None or not isinstance(value, Decimal):
        return
    precision, scale = limit
    if value != 0 and value.adjusted() >= precision - scale:
        raise CastError(f"{value} is too large for numeric({precision},{scale}) "
                        f"(at most {precision - scale} digits before the decimal point)")


def identity_rejects(payload: dict, keys: IdentityKeys) -> list[tuple[str, str]]:
    """(payload field, reason) for each identity field of a customer payload that no identity can be
    read from: an object, a list or a boolean where text is expected, or a text over `MAX_TEXT`
    characters. The resolve stage reads such a field as absent; the map stage quarantines the record."""
    fields = [keys.name, *keys.phones, keys.email, keys.company, keys.city]
    out = []
    for name in dict.fromkeys(f for f in fields if f):
        value = payload.get(name)
        if isinstance(value, (dict, list, tuple, bool)):
            out.append((name, f"identity field {name!r}: expected text, got {shape(value)}"))
        elif isinstance(value, str) and len(value.strip()) > MAX_TEXT:
            out.append((name, f"identity field {name!r} is {len(value.strip())} characters long, more than the "
                              f"{MAX_TEXT} characters any text value may have"))
    return out


FETCH_ROWS = 20_000  # staged rows read, cast and COPYed per batch: memory stays flat at any run size


def _fast_cast(fm: FieldMap, key: bool):
    """A cast for the common case — a text value that is already stripped, non-empty, without NUL
    and within `MAX_TEXT` — that gives exactly what `cast` gives, or raises anything when it cannot
    tell (the caller then asks `cast`, which words the reason). None when `cast` must do it all."""
    if fm.values is not None:
        return None
    kind, max_length = fm.type, fm.max_length
    if kind == "text" and key:
        from crm_sync.keys import canonical_key

        def text_key(value: str):
            text = canonical_key(value)
            if max_length is not None and len(text) > max_length:
                raise CastError(text)
            return text
        return text_key
    if kind == "text":
        if max_length is None:
            return str
        def text(value: str):
            if len(value) > max_length:
                raise CastError(value)
            return value
        return text
    if kind == "timestamptz":
        def timestamptz(value: str):
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                raise CastError(value)
            return parsed
        return timestamptz
    if kind == "date":
        def date_(value: str):
            return date.fromisoformat(value[:10]) if len(value) >= 10 else date.fromisoformat(value)
        return date_
    if kind == "numeric":
        scale = fm.scale
        def numeric(value: str):
            number = Decimal(value.replace(",", ""))
            if not number.is_finite() or (scale is not None and -number.as_tuple().exponent > scale):
                raise CastError(value)
            return number
        return numeric
    return None


def _cast_plan(fm: FieldMap, key: bool, limit: tuple[int, int] | None):
    """The field's cast, decided once per stream: the fast path where it applies, `cast` otherwise,
    and the column's numeric limit (`_fits`) when it has one."""
    fast = _fast_cast(fm, key)
    required = fm.required or fm.values is not None

    def plan(value):
        if fast is not None:
            if value is None and not required:
                return None
            if (type(value) is str and value and "\x00" not in value and len(value) <= MAX_TEXT
                    and value.strip() is value):
                try:
                    result = fast(value)
                except Exception:  # noqa: BLE001 - `cast` decides, and words the reason
                    result = cast(value, fm, key=key)
                if limit is not None:
                    _fits(result, limit)
                return result
        result = cast(value, fm, key=key)
        if limit is not None:
            _fits(result, limit)
        return result
    return plan


def _reader(fm: FieldMap):
    """`source_value` for one field map, decided once: a plain `from` is one dict lookup."""
    if isinstance(fm.from_, str):
        name = fm.from_
        return lambda payload: payload.get(name)
    return lambda payload: source_value(payload, fm)


def _sql_fields(field_maps: dict[str, FieldMap], key_fields: set[str], limits: dict[str, tuple[int, int]],
                value) -> dict[str, mapsql.Field] | None:
    """Every field map of the stream as SQL (`mapsql.field_sql`), or None when one needs Python;
    `value(name)` gives the (jsonb, text) SQL of a payload field."""
    fields = {}
    for target, fm in field_maps.items():
        field = (mapsql.field_sql(*value(fm.from_), fm, key=target in key_fields, limit=limits.get(target))
                 if isinstance(fm.from_, str) else None)
        if field is None:
            return None
        fields[target] = field
    return fields


def _select_sql(entity: str, columns: list[str], types: dict[str, str], fields: dict[str, mapsql.Field],
                resolved: str) -> str:
    """The select list of the set-based path: each staging column from its field's SQL (customers: the
    resolve stage's identity columns win, a name the identity fields lack keeps the mapped one)."""
    out = []
    for c in columns:
        mapped = f"({fields[c].expr})" if c in fields else "null"
        if entity == "customer" and c == "full_name":
            value = f"coalesce({resolved}.full_name, {mapped})"
        elif entity == "customer" and c in RESOLVED_COLUMNS:
            value = f"{resolved}.{c}"
        else:
            value = mapped
        out.append(f"({value})::{types[c]} as {c}")
    return ", ".join(out)


def map_stream(conn, run_id: str, cfg: SourceConfig, stream: StreamConfig, *, set_based: bool = True) -> MapResult:
    """Map one stream of the run from `stg.extracted` into `stg.mapped_<entity>`, in one transaction
    (the caller commits).

    Records whose every field `mapsql` can map exactly are mapped by one `insert … select`; the rest
    (all of them with `set_based=False`, or when a field map needs Python) are read with a
    server-side cursor and cast a batch at a time in Python — memory does not grow with the run —
    into a temporary table, from which they join the others. `row_hash` is computed in SQL for both."""
    entity = stream.entity
    spec = entities.get(entity)
    table = spec.staging
    columns = staging_columns(entity)
    field_maps = {target: _money_scale(entity, fm, target) for target, fm in stream.mapping.items()}
    # a fact's customer reference (unless it is a phone) and any id-like field are record keys
    key_fields = {t for t, fm in field_maps.items() if fm.type == "text" and is_key_field(t)}
    limits = _numeric_limits(entity)
    plans = [(target, fm, fm.source_fields, _reader(fm), _cast_plan(fm, target in key_fields, limits.get(target)))
             for target, fm in field_maps.items()]
    identity = stream.identity if entity == "customer" else None
    identity_fields = ([f for f in dict.fromkeys([identity.name, *identity.phones, identity.email, identity.company,
                                                  identity.city]) if f] if identity is not None else [])
    hashed_columns = [c for c in columns if c != "customer_id"]
    rejects: list[quarantine.Reject] = []

    def reject(source_pk, field, reason, payload):
        where = quarantine.where(cfg.source, stream.name, source_pk, field)
        rejects.append(quarantine.Reject(stream.name, source_pk, "map", field, f"{where}: {reason}", payload))

    def mapped(rows):
        for source_pk, payload, *resolved in rows:
            values: dict = {}
            bad_fields: set[str] = set()
            if identity_fields and any(v is not None and (type(v) is not str or len(v) > MAX_TEXT)
                                       for v in map(payload.get, identity_fields)):
                for name, reason in identity_rejects(payload, identity):
                    reject(source_pk, name, reason, payload)
                    bad_fields.add(name)
            failed = bool(bad_fields)
            for target, fm, fields, read, plan in plans:
                if bad_fields and fields & bad_fields:
                    continue  # already quarantined for this payload field
                try:
                    values[target] = plan(read(payload))
                except CastError as exc:
                    origin = f" (from {fm.label!r})" if fm.label != target else ""
                    reject(source_pk, target, f"{exc}{origin}", payload)
                    failed = True
            if failed:
                continue
            if entity == "customer":
                # the normalised identity values win; a name the identity fields lack keeps the mapped one
                values.update({c: v for c, v in zip(RESOLVED_COLUMNS, resolved)
                               if v is not None or c != "full_name"})
                values["customer_id"] = str(values["customer_id"])
            yield [run_id, cfg.source, stream.name, source_pk, *[values.get(c) for c in columns]]

    if entity == "customer":
        source_sql = """from stg.extracted e join stg.resolved r using (run_id, source, stream, source_pk)
                        where e.run_id = %s and e.source = %s and e.stream = %s"""
        query = f"select e.source_pk, e.payload, {', '.join('r.' + c for c in RESOLVED_COLUMNS)} {source_sql}"
    else:
        source_sql = "from stg.extracted e where e.run_id = %s and e.source = %s and e.stream = %s"
        query = f"select e.source_pk, e.payload {source_sql}"
    keys = ["run_id", "source", "stream", "source_pk"]
    out_columns = [*keys, *columns, "row_hash"]
    insert = f"insert into {table} ({', '.join(out_columns)}) "
    written = in_sql = 0
    with conn.cursor() as cur:
        staging.delete_run(cur, table, run_id, cfg.source, stream.name)
        quarantine.clear(cur, run_id, cfg.source, stream.name, stage="map")
        types = mapsql.column_types(cur, table)
        row_hash_sql = mapsql.hash_sql("m", hashed_columns, types)
        # each payload field the SQL reads is taken out of the jsonb once, in a subquery the planner
        # keeps (`offset 0`), not once per use in the guards
        payload_fields: dict[str, int] = {}

        def value(name: str) -> tuple[str, str]:
            i = payload_fields.setdefault(name, len(payload_fields))
            return f"x.j{i}", f"x.t{i}"
        fields = _sql_fields(field_maps, key_fields, limits, value) if set_based else None
        if fields is not None:
            guard = " and ".join([*(f.guard for f in fields.values()),
                                  mapsql.identity_guard([value(f) for f in identity_fields])])
            taken = ", ".join(f"e.payload -> {mapsql.literal(n)} as j{i}, e.payload ->> {mapsql.literal(n)} as t{i}"
                              for n, i in payload_fields.items())
            resolved_sql = "".join(f", r.{c}" for c in RESOLVED_COLUMNS) if entity == "customer" else ""
            selected = _select_sql(entity, columns, types, fields, resolved="x")
            cur.execute(f"""{insert} select {', '.join('m.' + c for c in keys + columns)}, {row_hash_sql}
                            from (select {', '.join('x.' + c for c in keys)}, {selected}
                                  from (select {', '.join('e.' + c for c in keys)}{resolved_sql}, {taken}
                                        {source_sql} offset 0) x
                                  where {guard}) m""", (run_id, cfg.source, stream.name))
            written = in_sql = cur.rowcount
            cur.execute("select count(*) from stg.extracted where run_id = %s and source = %s and stream = %s",
                        (run_id, cfg.source, stream.name))
            if cur.fetchone()[0] == in_sql:
                query += " and false"   # every record mapped: nothing left for Python
            # the rest: what the statement did not map (by key, not by the guards again)
            query += f""" and not exists (select from {table} m where m.run_id = e.run_id and m.source = e.source
                                           and m.stream = e.stream and m.source_pk = e.source_pk)"""
        # the rest through Python, into a temporary copy of the staging table without its hash
        scratch = f"crm_sync_map_{entity}"
        cur.execute(f"create temp table if not exists {scratch} as select * from {table} with no data;"
                    f" truncate {scratch}")
        with conn.cursor(name=f"crm_sync_map_{stream.name}") as staged:
            staged.itersize = FETCH_ROWS
            staged.execute(query, (run_id, cfg.source, stream.name))
            while True:
                rows = staged.fetchmany(FETCH_ROWS)
                if not rows:
                    break
                # each batch is mapped in full before its COPY: the COPY cannot share the
                # connection with the server-side cursor while that one is being read
                staging.copy_rows(cur, f"pg_temp.{scratch}", [*keys, *columns], list(mapped(rows)))
        cur.execute(f"{insert} select {', '.join('m.' + c for c in keys + columns)}, {row_hash_sql}"
                    f" from pg_temp.{scratch} m")
        written += cur.rowcount
        cur.execute(f"truncate {scratch}")
        quarantine.add(cur, run_id, cfg.source, rejects)
        staging.analyze(cur, table)
    return MapResult(mapped=written, rejected=len({r.source_pk for r in rejects}), in_sql=in_sql)
