"""`mapping.row_hash` hashes exactly the `to_json` text of the mapped values, whatever their types:
a row mapped today must hash as it did when the load stored its hash (an unchanged row stays unchanged)."""
from __future__ import annotations

import hashlib
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from crm_sync import mapping
from crm_sync.staging import to_json

SHANGHAI = timezone(timedelta(hours=8))
ROWS = [
    {"full_name": "王伟", "city": None, "amount": Decimal("0.10"), "n": 7, "flag": True},
    {"text": 'quote " back\\slash \t tab \n newline \x01 ctrl \u2028 ls 😀', "empty": ""},
    {"at": datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=SHANGHAI), "naive": datetime(2026, 1, 2),
     "d": date(2026, 2, 28), "big": 2**70, "neg": Decimal("-1E+2"), "off": False},
    {"f": 0.1, "nan": float("nan"), "inf": float("inf")},           # floats: the JSON encoder's own spelling
    {"u": uuid.UUID(int=5), "j": {"a": [1, Decimal("2.50")]}, "l": [None, "x"]},  # through to_json
    {1: "a non-str key"},
    {},
]


@pytest.mark.parametrize("values", ROWS)
def test_row_hash_is_the_hash_of_the_to_json_text(values):
    assert mapping._json_text(values) == to_json(values)
    assert mapping.row_hash(values) == hashlib.sha256(to_json(values).encode()).hexdigest()[:32]


def test_row_hash_tells_values_of_different_types_apart():
    assert mapping.row_hash({"v": "1"}) != mapping.row_hash({"v": 1})
    assert mapping.row_hash({"v": None}) != mapping.row_hash({"v": "null"})
    assert mapping.row_hash({"v": True}) != mapping.row_hash({"v": "true"})
