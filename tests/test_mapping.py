"""Field maps as the YAML declares them: where a value comes from, how it is cast, what a reject says."""
from __future__ import annotations

from decimal import Decimal

import pytest

from crm_sync.config import FieldMap, SourceConfig
from crm_sync.mapping import CastError, _money_scale, cast, is_key_field, source_value
from crm_sync.sources import base


def fm(**kw) -> FieldMap:
    return FieldMap.model_validate(kw)


@pytest.mark.parametrize("text, decimal_comma, expected", [
    ("1,234.50", False, "1234.50"),
    ("¥1,234.5", False, "1234.50"),
    ("1234.5元", False, "1234.50"),
    ("１，２３４．５０", False, "1234.50"),
    ("(1,234.50)", False, "-1234.50"),
    ("1.234,50", True, "1234.50"),
    (Decimal("7.1"), False, "7.10"),
])
def test_money_text_in_every_form_becomes_the_exact_decimal_at_the_entity_scale(text, decimal_comma, expected):
    amount = _money_scale("invoice", fm(**{"from": "je", "type": "money", "decimal_comma": decimal_comma}), "amount")
    value = cast(text, amount)
    assert value == Decimal(expected) and str(value) == expected  # scale 2 kept: '1234.50', not '1234.5'


def test_money_errors_name_the_value_and_never_round():
    amount = _money_scale("payment", fm(**{"from": "skje", "type": "money"}), "amount")
    with pytest.raises(CastError, match=r"1\.234,50"):
        cast("1.234,50", amount)  # decimal comma not declared: refused, not read as 1.234
    with pytest.raises(CastError, match="decimal places"):
        cast("10.005", amount)
    with pytest.raises(CastError, match="binary float"):
        cast(10.5, amount)


def test_pick_takes_the_customers_number_by_direction():
    number = fm(pick={"field": "direction", "cases": {"inbound": "caller", "outbound": "callee"}}, type="phone")
    inbound = {"direction": "inbound", "caller": "+86 138 0013 8000", "callee": "400-820-8820"}
    outbound = {"direction": "outbound", "caller": "400-820-8820", "callee": "０086-138-0013-8000"}
    assert cast(source_value(inbound, number), number) == "+8613800138000"
    assert cast(source_value(outbound, number), number) == "+8613800138000"
    with pytest.raises(CastError, match="direction is 'transfer'"):
        source_value({"direction": "transfer"}, number)


def test_phone_keeps_the_extension_so_a_desk_is_not_its_switchboard():
    phone = fm(**{"from": "n", "type": "phone"})
    assert cast("010-87654321转123", phone) == "+861087654321;ext=123"
    assert cast("010-87654321", phone) == "+861087654321"
    with pytest.raises(CastError, match="not a phone number"):
        cast("12", phone)


def test_first_non_empty_of_several_fields_and_constants():
    name = fm(**{"from": ["remark_name", "nickname"]})
    assert source_value({"remark_name": " ", "nickname": "Tony"}, name) == "Tony"
    assert source_value({"remark_name": "张先生", "nickname": "Tony"}, name) == "张先生"
    assert name.source_fields == {"remark_name", "nickname"}
    assert source_value({}, fm(value="phone")) == "phone"
    with pytest.raises(ValueError, match="exactly one of"):
        fm(**{"from": "a", "value": "b"})


def test_wrong_shapes_nul_and_oversized_text_are_rejected_with_a_reason():
    assert cast(["报价", "售后"], fm(**{"from": "tags", "type": "json"})) == ["报价", "售后"]
    assert cast({"code": "A1"}, fm(**{"from": "tags", "type": "json"})) == {"code": "A1"}
    with pytest.raises(CastError, match="JSON list or object"):
        cast("报价", fm(**{"from": "tags", "type": "json"}))
    with pytest.raises(CastError, match="expected text, got a JSON object"):
        cast({"a": 1}, fm(**{"from": "subject"}))
    with pytest.raises(CastError, match="NUL"):
        cast("a\x00b", fm(**{"from": "subject"}))
    with pytest.raises(CastError, match="10000 characters long"):
        cast("x" * 10_000, fm(**{"from": "id", "max_length": 200}))


@pytest.mark.parametrize("value, kind, message", [
    ({"city": "上海"}, "text", "expected text, got a JSON object"),
    (["a", "b"], "text", "expected text, got a JSON list"),
    (True, "text", r"expected text, got a boolean \(true\)"),
    ({"n": 1}, "int", "expected a whole number, got a JSON object"),
    (False, "int", r"expected a whole number, got a boolean \(false\)"),
    (True, "numeric", "expected a number, got a boolean"),
    ([1, 2], "numeric", "expected a number, got a JSON list"),
    (True, "money", "expected a money amount, got a boolean"),
    ({"v": "2026-11-20"}, "date", "expected a date, got a JSON object"),
    (20261120, "date", r"expected a date, got a number \(20261120\)"),
    (["2026-11-20T08:00:00Z"], "timestamptz", "expected a timestamp, got a JSON list"),
    ({"mobile": "13800138000"}, "phone", "expected a phone number, got a JSON object"),
    (True, "phone", "expected a phone number, got a boolean"),
    ({"x": 1}, "bool", "expected a boolean, got a JSON object"),
    ("tag", "json", "expected a JSON list or object, got text 'tag'"),
])
def test_a_value_of_the_wrong_shape_names_what_arrived_and_is_never_a_python_repr(value, kind, message):
    with pytest.raises(CastError, match=message) as err:
        cast(value, fm(**{"from": "f", "type": kind}))
    assert "{" not in str(err.value) and "[" not in str(err.value)  # no repr of the object


def test_any_text_over_10000_characters_is_refused_even_without_max_length():
    assert cast("x" * 10_000, fm(**{"from": "summary"})) == "x" * 10_000
    with pytest.raises(CastError, match=r"field 'summary' is 10001 characters long"):
        cast("x" * 10_001, fm(**{"from": "summary"}))
    with pytest.raises(CastError, match=r"field 'd' is 20000 characters long"):
        cast("2" * 20_000, fm(**{"from": "d", "type": "date"}))


def test_numbers_and_booleans_of_the_right_shape_still_cast():
    assert cast(True, fm(**{"from": "b", "type": "bool"})) is True
    assert cast(3.0, fm(**{"from": "n", "type": "int"})) == 3
    assert cast("42", fm(**{"from": "n", "type": "int"})) == 42
    assert cast(7, fm(**{"from": "s"})) == "7"
    with pytest.raises(CastError, match="out of the range of an integer"):
        cast(2**40, fm(**{"from": "n", "type": "int"}))
    # a value map is looked up with the JSON spelling of a boolean, not Python's
    assert cast(True, fm(**{"from": "vip", "values": {"true": "vip", "false": "regular"}})) == "vip"
    with pytest.raises(CastError, match="expected one of the mapped values .*, got a JSON object"):
        cast({"code": 1}, fm(**{"from": "status", "values": {"1": "open"}}))


@pytest.mark.parametrize("raw", [1, 1.0, "1", " 1 ", "1.0", "1.00"])
def test_a_customer_reference_is_a_canonical_key(raw):
    ref = fm(**{"from": "customer_no", "required": True})
    assert cast(raw, ref, key=True) == "1"


def test_key_fields_keep_leading_zeros_and_refuse_shapes_no_key_has():
    ref = fm(**{"from": "customer_no"})
    assert cast("0042", ref, key=True) == "0042"
    assert cast("C100001", ref, key=True) == "C100001"
    with pytest.raises(CastError, match="expected text, got a boolean"):
        cast(True, ref, key=True)
    assert is_key_field("source_customer_id") and is_key_field("invoice_ref") and not is_key_field("currency")


def test_a_money_column_mapped_as_text_is_a_config_error():
    with pytest.raises(ValueError, match="invoice.amount is money"):
        SourceConfig.model_validate({
            "source": "f", "kind": "sql", "conn_id": "x", "schedule": "@daily", "sync_mode": "full",
            "streams": [{"name": "invoices", "entity": "invoice", "primary_key": "id", "cursor_field": "u",
                         "query": "select 1", "expectation_suite": "invoice",
                         "mapping": {"source_customer_id": {"from": "c"}, "amount": {"from": "a"}}}]})


def test_every_kind_has_one_registered_extractor_class():
    assert {k: base.extractor_class(k).__name__ for k in ("sql", "http", "files")} == {
        "sql": "SqlExtractor", "http": "HttpExtractor", "files": "FilesExtractor"}
    with pytest.raises(KeyError, match="no extractor for kind 'ftp'"):
        base.extractor_class("ftp")
