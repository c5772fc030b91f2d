"""Money text becomes an exact Decimal, or an error that names the value; a float never becomes money."""
from __future__ import annotations

from decimal import Decimal

import pytest

from crm_sync.money import MoneyError, parse_money

D = Decimal

# (text, decimal_comma, expected): every form the sources write, each read digit for digit
CORPUS = [
    ("1234.5", False, D("1234.5")),
    ("1234.50", False, D("1234.50")),
    ("1,234.50", False, D("1234.50")),
    ("1,234,567.89", False, D("1234567.89")),
    ("¥1,234.5", False, D("1234.5")),
    ("￥1,234.5", False, D("1234.5")),
    ("¥ 1,234.50", False, D("1234.50")),
    ("RMB 1,234.50", False, D("1234.50")),
    ("rmb1234.50", False, D("1234.50")),
    ("1234.5元", False, D("1234.5")),
    ("1,234.50 元", False, D("1234.50")),
    ("CNY1234.50", False, D("1234.50")),
    ("1234.50 CNY", False, D("1234.50")),
    ("$1,234.50", False, D("1234.50")),
    ("USD 1,234.50", False, D("1234.50")),
    ("-1,234.50", False, D("-1234.50")),
    ("+1,234.50", False, D("1234.50")),
    ("-¥1,234.50", False, D("-1234.50")),
    ("¥-1,234.50", False, D("-1234.50")),
    ("(1,234.50)", False, D("-1234.50")),
    ("(¥1,234.50)", False, D("-1234.50")),
    ("１，２３４．５０", False, D("1234.50")),
    ("（１，２３４．５０）", False, D("-1234.50")),
    ("－１２３４．５", False, D("-1234.5")),
    ("  1234.50\t", False, D("1234.50")),
    ("0", False, D("0")),
    ("0.01", False, D("0.01")),
    ("1234", False, D("1234")),
    ("1.234,50", True, D("1234.50")),
    ("1.234.567,89", True, D("1234567.89")),
    ("1 234,50", True, D("1234.50")),
    ("1\u00a0234,50", True, D("1234.50")),
    ("1'234,50", True, D("1234.50")),
    ("1234,5", True, D("1234.5")),
    ("1234", True, D("1234")),
    ("€1.234,50", True, D("1234.50")),
    ("(1.234,50)", True, D("-1234.50")),
    # values a float cannot hold: every digit must survive
    ("12345678901234567.89", False, D("12345678901234567.89")),
    ("12,345,678,901,234,567.89", False, D("12345678901234567.89")),
    ("9007199254740993.01", False, D("9007199254740993.01")),
    ("9,007,199,254,740,993", False, D("9007199254740993")),
    ("12345678901234.57", False, D("12345678901234.57")),
    ("¥12,345,678,901,234.57", False, D("12345678901234.57")),
    ("12.345.678.901.234,57", True, D("12345678901234.57")),
    ("123456789012345678901234567890.12", False, D("123456789012345678901234567890.12")),
    ("(123456789012345678901234567890.12)", False, D("-123456789012345678901234567890.12")),
]


@pytest.mark.parametrize(("text", "decimal_comma", "expected"), CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_parses_exactly(text, decimal_comma, expected):
    value = parse_money(text, decimal_comma=decimal_comma)
    assert isinstance(value, Decimal)
    assert value == expected
    assert value.as_tuple() == expected.as_tuple(), "digits and exponent, not merely an equal value"


def test_large_values_keep_the_digit_a_float_loses():
    for text in ("12345678901234567.89", "9007199254740993.01", "1234567890123456.78"):
        assert Decimal(repr(float(text))) != Decimal(text), "the float must really lose a digit for this test"
        assert str(parse_money(text)) == text
    assert Decimal(float("12345678901234.57")) != parse_money("12345678901234.57") == Decimal("12345678901234.57")
    assert float("9007199254740993") == float("9007199254740992")
    assert parse_money("9007199254740993") != parse_money("9007199254740992")


def test_sums_are_exact():
    assert 0.1 + 0.2 != 0.3
    assert parse_money("0.1") + parse_money("0.2") == Decimal("0.3")
    assert sum(parse_money("0.10") for _ in range(10)) == Decimal("1.00")
    texts = ["12345678901234567.89", "0.01", "(0.90)", "１，０００．００", "¥-1,000.00", "9007199254740993.01"]
    total = sum(parse_money(t) for t in texts)
    assert total == Decimal("12345678901234567.89") + Decimal("9007199254740993.01") - Decimal("0.89")
    assert total == Decimal("21352878155975560.01")
    assert Decimal(sum(float(parse_money(t)) for t in texts)) != total, "a float sum would have lost the cents"


def test_empty_means_no_value():
    for value in (None, "", "   ", "\t\n", "\u3000"):
        assert parse_money(value) is None
        assert parse_money(value, scale=2) is None


def test_decimal_and_int_pass_through():
    assert parse_money(Decimal("1234.567")) == Decimal("1234.567")
    assert parse_money(1234) == Decimal(1234) and isinstance(parse_money(1234), Decimal)
    assert parse_money(10**30) == Decimal(10**30)
    assert parse_money(Decimal("1.5"), scale=2).as_tuple() == Decimal("1.50").as_tuple()
    assert str(parse_money(7, scale=2)) == "7.00"


@pytest.mark.parametrize("value", [0.1, 1234.5, float("nan"), 0.0])
def test_float_is_refused(value):
    with pytest.raises(MoneyError, match="binary float; money must come as text or decimal") as info:
        parse_money(value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("1,234.5", "1234.50"),
    ("1234", "1234.00"),
    ("0", "0.00"),
    ("(1.5)", "-1.50"),
    ("1,234.50", "1234.50"),
    ("12345678901234567.8", "12345678901234567.80"),
    ("123456789012345678901234567890.1", "123456789012345678901234567890.10"),
])
def test_scale_pads_to_exactly_that_many_places(text, expected):
    value = parse_money(text, scale=2)
    assert str(value) == expected
    assert value.as_tuple().exponent == -2


def test_scale_never_rounds():
    for text in ("1234.567", "0.001", "1,234.505"):
        with pytest.raises(MoneyError, match="has more than 2 decimal places") as info:
            parse_money(text, scale=2)
        assert repr(text) in str(info.value)
    with pytest.raises(MoneyError, match="more than 0 decimal places"):
        parse_money("1.5", scale=0)
    with pytest.raises(MoneyError, match="more than 2 decimal places"):
        parse_money(Decimal("0.125"), scale=2)
    assert parse_money("15", scale=0) == Decimal("15")


@pytest.mark.parametrize(("value", "decimal_comma", "reason"), [
    ("1,23.4", False, "grouping"),
    ("12,34", False, "decimal-comma"),
    ("1234,567.00", False, "grouping"),
    ("1.234,50", False, "decimal-comma"),
    ("1.234.567,89", False, "decimal-comma"),
    ("1.2.3", False, "at most one decimal mark"),
    ("1.234.50", False, "at most one decimal mark"),
    ("1,234.50", True, "at most one decimal mark"),
    ("1,23,4", True, "at most one decimal mark"),
    ("1.23,4", True, "grouping"),
    ("1.234 567,89", True, "grouping"),
    ("1 234.50", False, "grouping"),
    ("abc", False, "not part of an amount"),
    ("12a.50", False, "not part of an amount"),
    ("1e5", False, "not part of an amount"),
    ("NaN", False, "not part of an amount"),
    ("nan", False, "not part of an amount"),
    ("Infinity", False, "not part of an amount"),
    ("-inf", False, "not part of an amount"),
    ("0x10", False, "not part of an amount"),
    ("1_000", False, "not part of an amount"),
    ("¥", False, "no digits"),
    ("RMB", False, "no digits"),
    ("元", False, "no digits"),
    ("()", False, "no digits"),
    ("-", False, "no digits"),
    ("--1", False, "more than one sign"),
    ("-¥-1", False, "more than one sign"),
    ("(-1.00)", False, "more than one sign"),
    ("¥¥1", False, "not part of an amount"),
    ("1.", False, "decimal mark"),
    (".5", False, "decimal mark"),
    ("1,234.5.0", False, "decimal mark"),
    ("١٢٣", False, "not part of an amount"),
])
def test_bad_text_raises_with_the_value_and_a_reason(value, decimal_comma, reason):
    with pytest.raises(MoneyError) as info:
        parse_money(value, decimal_comma=decimal_comma)
    message = str(info.value)
    assert repr(value) in message
    assert reason in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity"), True, b"12", [1]])
def test_non_amount_objects_raise(value):
    with pytest.raises(MoneyError) as info:
        parse_money(value)
    assert repr(value) in str(info.value)
