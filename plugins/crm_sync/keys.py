"""Record keys in one canonical text form, whatever type the source sent them as.

A source that sends an id as `1` today and `1.0` or `" 1"` tomorrow (a JSON number that went
through a float, a spreadsheet cell, a padded CHAR column) must not create a second source
record. `canonical_key` is applied to primary keys at extract and to customer references at map.
"""
from __future__ import annotations

import hashlib
from decimal import Decimal, InvalidOperation


class KeyError_(ValueError):
    """A value cannot serve as a key (an object, a list, a boolean, a non-finite number)."""


def canonical_key(value) -> str | None:
    """The canonical text of a key value; None for a missing or blank key.

    Integers and integral floats/decimals become their integer digits (`1`, `1.0`, `Decimal('1.00')`
    → `'1'`); text is stripped of surrounding whitespace, and a text that is exactly an integral
    decimal number (`'1.0'`, `'0042'` stays `'0042'`) keeps its digits — only the `.0…` tail goes,
    because leading zeros are meaningful in many business ids. Raises `KeyError_` for shapes no
    key can have."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise KeyError_(f"a key cannot be a boolean ({value!r})")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise KeyError_(f"a key cannot be {value!r}")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise KeyError_(f"a key cannot be {value!r}")
        return str(int(value)) if value == value.to_integral_value() else format(value.normalize(), "f")
    if isinstance(value, (dict, list, tuple, set)):
        raise KeyError_(f"a key cannot be a JSON {'object' if isinstance(value, dict) else 'list'}")
    text = str(value).strip()
    if text == "":
        return None
    head, dot, tail = text.partition(".")
    if dot and tail and set(tail) == {"0"} and head.lstrip("-").isdigit():
        return head
    return text


def key_hash(key: str) -> int:
    """A 60-bit hash of a key that PostgreSQL computes identically (`KEY_HASH_SQL`), for checksums."""
    return int(hashlib.md5(key.encode("utf-8")).hexdigest()[:15], 16)


def key_hash_sql(expr: str) -> str:
    """SQL of `key_hash` over a text expression."""
    return f"('x' || substr(md5({expr}), 1, 15))::bit(60)::bigint"


def checksum(keys) -> int:
    """Order-independent checksum of a multiset of keys (sum of `key_hash`)."""
    return sum(key_hash(k) for k in keys)
