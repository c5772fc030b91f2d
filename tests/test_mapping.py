"""Field maps as the YAML declares them: where a value comes from, how it is cast, what a reject says."""
from __future__ import annotations

from decimal import Decimal

import pytest

from crm_sync.config import FieldMap, SourceConfig
from crm_sync.mapping import CastError, _money_scale, cast, source_value
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
    with pytest.raises(CastError, match="JSON list or object"):
        cast("报价", fm(**{"from": "tags", "type": "json"}))
    with pytest.raises(CastError, match="expected text, got a JSON dict"):
        cast({"a": 1}, fm(**{"from": "subject"}))
    with pytest.raises(CastError, match="NUL"):
        cast("a\x00b", fm(**{"from": "subject"}))
    with pytest.raises(CastError, match="10000 characters long"):
        cast("x" * 10_000, fm(**{"from": "id", "max_length": 200}))


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
