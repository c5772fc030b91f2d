"""Exact money parsing: text, `Decimal` or `int` in, `Decimal` out — or a `MoneyError` that says why.

Guarantees:
- A binary float is never turned into money: it raises, because its digits are already lost.
- No rounding, ever. Every digit of the input is kept; with `scale`, a value with more decimal
  places than `scale` raises, and one with fewer is padded with zeros to exactly `scale` places.
- Text is NFKC-normalised first (full-width `１，２３４．５０` reads as `1,234.50`), then may carry
  one currency mark before (`¥ ￥ $ RMB CNY ...`) and after (`元 RMB CNY ...`), a sign, or
  accounting parentheses `(1,234.50)` for a negative amount.
- Grouping must be real 3-digit groups (`1,23.4` raises). `,` groups and `.` is the decimal mark,
  unless `decimal_comma=True`: then `.`, space or `'` group and `,` is the decimal mark.
- None, "" and whitespace are None (no value); anything else that is not an amount (letters,
  two decimal marks, NaN, Infinity, a bare currency mark) raises `MoneyError` quoting the value.
"""
from __future__ import annotations

import re
import unicodedata
from decimal import Context, Decimal

__all__ = ["MoneyError", "parse_money"]


class MoneyError(ValueError):
    """A value that cannot be read as an exact amount of money."""


_CURRENCY = r"(?:RMB|CNY|USD|HKD|EUR|US\$|HK\$|[¥$€£])"
# sign, currency mark, sign, number, currency mark: each part optional, the number checked below
_PARTS = re.compile(rf"(?P<s1>[+-]?)\s*(?:{_CURRENCY}\s*)?(?P<s2>[+-]?)\s*(?P<num>.*?)\s*(?:{_CURRENCY}|元)?",
                    re.IGNORECASE | re.DOTALL)
_POINT = re.compile(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?P<frac>\.\d+)?", re.ASCII)
_COMMA = re.compile(r"(?:\d{1,3}(?P<sep>[. '])\d{3}(?:(?P=sep)\d{3})*|\d+)(?P<frac>,\d+)?", re.ASCII)


def _fail(value: object, reason: str) -> MoneyError:
    return MoneyError(f"{value!r} is not a money amount: {reason}")


def _parse_text(value: str, decimal_comma: bool) -> Decimal | None:
    text = unicodedata.normalize("NFKC", value).strip().replace("\u2212", "-")
    if not text:
        return None
    parenthesised = text.startswith("(") and text.endswith(")")
    if parenthesised:
        text = text[1:-1].strip()
    parts = _PARTS.fullmatch(text)
    signs = parts["s1"] + parts["s2"]
    if len(signs) > 1 or (signs and parenthesised):
        raise _fail(value, "has more than one sign")
    number = parts["num"]
    if not number:
        raise _fail(value, "has no digits")
    if re.search(r"[^\d.,' ]", number, re.ASCII):
        raise _fail(value, "contains characters that are not part of an amount")
    match = (_COMMA if decimal_comma else _POINT).fullmatch(number)
    if match is None:
        if not decimal_comma and re.fullmatch(r"[\d.]+,\d{1,2}", number):
            raise _fail(value, "looks like decimal-comma notation, which was not declared for it")
        raise _fail(value, "is not a number with valid 3-digit grouping and at most one decimal mark")
    fraction = match["frac"] or ""
    integer = re.sub(r"\D", "", number[: len(number) - len(fraction)])
    amount = Decimal(integer + "." + fraction[1:] if fraction else integer)
    # copy_negate is exact, where `-amount` would round to the context precision
    return amount.copy_negate() if parenthesised or signs == "-" else amount


def parse_money(value: object, *, decimal_comma: bool = False, scale: int | None = None) -> Decimal | None:
    """`value` as an exact `Decimal` (see the module docstring), None for no value; raises `MoneyError`."""
    if value is None:
        return None
    if isinstance(value, float):
        raise MoneyError(f"{value!r} arrived as a binary float; money must come as text or decimal")
    if isinstance(value, Decimal):
        amount = value
    elif isinstance(value, int) and not isinstance(value, bool):
        amount = Decimal(value)
    elif isinstance(value, str):
        amount = _parse_text(value, decimal_comma)
        if amount is None:
            return None
    else:
        raise _fail(value, f"unsupported type {type(value).__name__}")
    if not amount.is_finite():
        raise _fail(value, "is not a finite number")
    if scale is not None:
        if -amount.as_tuple().exponent > scale:
            raise _fail(value, f"has more than {scale} decimal places")
        precision = Context(prec=max(amount.adjusted(), 0) + scale + 2)  # quantize must not round
        amount = amount.quantize(Decimal(1).scaleb(-scale), context=precision)
    return amount
