"""Masking of personal data in text that leaves the pipeline: alerts, logs, run-log errors.

Guarantees:
- `mask_text(text)` replaces every phone number with `***` + its last 4 digits and every e-mail
  address with its first character + `***@` + domain. Phones are recognised in the shapes the
  sources send: `+86 138 0013 8000`, `0086-13800138000`, `8613800138000`, `13800138000`,
  `138-0013-8000`, landlines `010-87654321`, `(0755) 2345 6789`, `010-87654321转123` (the
  extension goes too; the 4 digits kept are the subscriber number's), other `+<country>` numbers,
  and any of these in full-width digits (`１３８００１３８０００`).
- It leaves alone what an alert needs to stay readable: ISO dates and timestamps, run ids
  (`manual__2026-11-24T06:53:17.219149+00:00`), UUIDs, long hex hashes, times, counts and
  decimal amounts (`1234.56`). A bare 7-8 digit number without an area code is a count, not a phone.
- It is idempotent (masking masked text changes nothing) and never raises: if masking itself
  fails, the text is withheld rather than passed on unmasked.
"""
from __future__ import annotations

import logging
import re
import unicodedata

log = logging.getLogger(__name__)

WITHHELD = "[text withheld: it could not be masked]"

_SEP = r"[ \t\u3000\-]"                 # space, ideographic space, hyphen
_PLUS = r"\+"
_CN = rf"(?:(?:{_PLUS}|00){_SEP}?86{_SEP}?|\({_PLUS}?86\){_SEP}?|86)"  # China country code
_EXT = r"(?P<ext>\s*(?:转|轉|分机|ext\.?|x|#)\s*\d{1,6})"

# Spans copied through untouched. Tried before the phone patterns at every position, so a
# timestamp's or a UUID's digits are never read as a phone number.
_PROTECTED = "|".join([
    r"(?:manual|scheduled|backfill|dataset_triggered|asset_triggered)__[^\s,;'\"]+",   # run ids
    r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b",  # UUIDs
    r"\b(?=[0-9a-fA-F]*[a-fA-F])(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{16,}\b",                 # hashes
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?",  # ISO
    r"\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?",                                            # times
    r"\d+\.\d+",                                                                      # decimals
])

_LABEL = r"[^\W_](?:[\w\-]*[^\W_])?"
_EMAIL = rf"(?P<email_local>[\w.%+\-]+)@(?P<email_domain>(?:{_LABEL}\.)+[^\W\d_]{{2,}})"

_PHONE = "|".join([
    # mainland mobile, optionally with the country code: 1[3-9]x xxxx xxxx
    rf"(?P<mobile>{_CN}?1[3-9]\d{_SEP}?\d{{4}}{_SEP}?\d{{4}})",
    # landline: area code (with its trunk 0, or after +86 without it), subscriber, optional extension
    rf"(?P<landline>(?:{_CN}\(?0?[1-9]\d{{1,2}}\)?|\(0[1-9]\d{{1,2}}\)|0[1-9]\d{{1,2}}){_SEP}?\d{{3,4}}{_SEP}?\d{{4}}){_EXT}?",
    # any other international number: +<country> and 7-13 more digits
    rf"(?P<intl>{_PLUS}[1-9]\d{{0,2}}(?:{_SEP}?\d){{7,13}})",
])

# A phone must not be glued to other digits or be the integer part of a decimal.
_PATTERN = re.compile(
    rf"(?P<keep>{_PROTECTED})"
    rf"|(?P<email>{_EMAIL})"
    rf"|(?<![\d.])(?:{_PHONE})(?!\d|[.,]\d)",
    re.IGNORECASE,
)
_PHONE_ONLY = re.compile(rf"\s*(?:{_PHONE})\s*", re.IGNORECASE)


def _ascii_digits(text: str) -> str:
    return "".join(str(unicodedata.digit(ch)) for ch in text if ch.isdigit())


def _masked_phone(number: str) -> str:
    return "***" + _ascii_digits(number)[-4:]


def _masked_email(local: str, domain: str) -> str:
    return f"{local[:1]}***@{domain}"


# Full-width digits and signs are matched through a one-to-one fold to ASCII, so match positions
# in the folded text are positions in the original.
_FOLD = str.maketrans({**{chr(0xFF10 + i): str(i) for i in range(10)},
                       "\uff0b": "+", "\uff0d": "-", "\uff08": "(", "\uff09": ")", "\uff20": "@"})


def _replacement(text: str, match: re.Match) -> str:
    if match.group("keep") is not None:
        return text[match.start():match.end()]
    if match.group("email") is not None:
        local = text[match.start("email_local"):match.end("email_local")]
        domain = text[match.start("email_domain"):match.end("email_domain")]
        return _masked_email(local, domain)
    name = next(g for g in ("mobile", "landline", "intl") if match.group(g) is not None)
    return _masked_phone(text[match.start(name):match.end(name)])


def _mask(text: str) -> str:
    parts: list[str] = []
    last = 0
    for match in _PATTERN.finditer(text.translate(_FOLD)):
        parts.append(text[last:match.start()])
        parts.append(_replacement(text, match))
        last = match.end()
    parts.append(text[last:])
    return "".join(parts)


def mask_text(text) -> str:
    """`text` with every phone number and e-mail address masked; never raises."""
    try:
        if text is None:
            return ""
        if not isinstance(text, str):
            text = str(text)
        return _mask(text)
    except Exception:  # noqa: BLE001 - a masking bug must not leak the text nor break the caller
        log.error("masking failed; text withheld")
        return WITHHELD


def mask_phone(value) -> str:
    """One phone number (any accepted shape) as `***` + its last 4 digits; never raises."""
    try:
        if value is None:
            return ""
        text = str(value)
        match = _PHONE_ONLY.fullmatch(text.translate(_FOLD))
        if match:
            name = next(g for g in ("mobile", "landline", "intl") if match.group(g) is not None)
            return _masked_phone(match.group(name))
        digits = _ascii_digits(text)
        if len(digits) > 4:  # an unusual shape: still never hand out more than the last 4 digits
            return _masked_phone(digits)
        return mask_text(text)
    except Exception:  # noqa: BLE001
        return "***"


def mask_email(value) -> str:
    """One e-mail address as first character + `***@` + domain; never raises."""
    try:
        if value is None:
            return ""
        text = str(value).strip()
        local, at, domain = text.rpartition("@")
        if at and local and domain and not any(ch.isspace() for ch in text):
            return _masked_email(local, domain)
        return mask_text(text)
    except Exception:  # noqa: BLE001
        return "***"


# What a field holds, by its name: the value of a phone or e-mail field is masked whatever its shape.
_PHONE_FIELD = re.compile(r"phone|mobile|(?:^|_)(?:tel|fax|cell)(?:_|$)|手机|电话", re.IGNORECASE)
_EMAIL_FIELD = re.compile(r"e_?mail|邮箱", re.IGNORECASE)
_NAME_FIELDS = {"name", "full_name", "name_key", "contact", "contact_name", "nickname", "remark_name"}
_DESCRIBES = re.compile(r"_(?:kind|type|valid|verified|status|count)$")  # phone_kind: about a phone, not one


def field_kind(field) -> str | None:
    """'phone', 'email' or 'name' when the field's name says it holds one, else None."""
    name = str(field or "").strip().lower()
    if _DESCRIBES.search(name):
        return None
    if _EMAIL_FIELD.search(name):
        return "email"
    if _PHONE_FIELD.search(name):
        return "phone"
    if name in _NAME_FIELDS:
        return "name"
    return None


def mask_field(field, value) -> str:
    """One value of the field `field`, as it may be shown; never raises.

    A phone field's value is `***` + its last 4 digits, or `***` when it has no more than 4; an
    e-mail field's is first character + `***@` + domain when it has the shape local@domain, else
    first character + `***` (`zhang.wei@` -> `z***`); a name field's is first character + `***`.
    Any other field's value goes through `mask_text` (a phone or address inside free text)."""
    try:
        if value is None:
            return ""
        if isinstance(value, bool):
            return str(value).lower()
        text = str(value).strip()
        kind = field_kind(field)
        if not text or kind is None:
            return mask_text(text)
        if kind == "phone":
            masked = mask_phone(text)
            return masked if masked.startswith("***") and masked != text else "***"
        if kind == "email":
            local, at, domain = text.rpartition("@")
            if at and local and domain and not any(ch.isspace() for ch in text):
                return mask_email(text)
        return text[:1] + "***"
    except Exception:  # noqa: BLE001
        return "***"
