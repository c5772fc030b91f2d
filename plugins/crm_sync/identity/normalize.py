"""Normalisers for identity evidence in messy Chinese customer data: phone, e-mail, person, company.

Guarantees, for every public function:
- never raises, whatever the input: None, "", non-str values (coerced with `str`), emoji, control
  and format characters, lone surrogates, full-width forms, huge strings;
- idempotent: feeding a normalised value back returns the same value (`nfkc`, `Name.full`,
  `Email.email`, `Company.key`, `Phone.e164`). Each cleaning pipeline is run to a fixed point,
  so this holds by construction rather than by careful ordering alone;
- deterministic and cached (`functools.lru_cache`), so repeated values cost a dict lookup;
  names, companies and e-mails are cut to their first 512 characters (after NFKC) first;
- nothing is guessed: a phone that does not validate stays `kind='invalid'` with `e164=None`,
  an e-mail that does not parse keeps its cleaned text with `valid=False`.

Libraries do the language work: `phonenumbers` parses, validates and types numbers, `opencc`
('t2s') folds traditional to simplified characters, `pypinyin` gives readings and the set of valid
pinyin syllables. Hand-written data is limited to honorifics, legal-form suffixes, role mailboxes,
common surnames and a table of major cities whose area codes the tests check against
phonenumbers' own geocoder.
"""
from __future__ import annotations

import functools
import re
import threading
import unicodedata
from dataclasses import dataclass
from typing import Callable

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberType

__all__ = [
    "Company", "Email", "Name", "Phone",
    "area_code_for_city", "nfkc", "normalize_company", "normalize_email", "normalize_person_name",
    "best_phone_part", "normalize_phone", "normalize_phones", "phone_parts", "pinyin_syllables", "to_simplified",
]

_CACHE = 2**18
# No real name, company or address is this long; cutting garbage here bounds the cost of pinyin
# and regex work on it (a megabyte of Han text would otherwise take most of a minute).
_MAX_CHARS = 512


# --------------------------------------------------------------------------- text basics

def _as_text(value: object) -> str | None:
    # Source payloads are JSON: a phone may arrive as an int, a name as a list. Callers should
    # not have to care, and unhashable values would break the caches.
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _drop_invisible(text: str) -> str:
    if text.isprintable():
        return text
    # Control/format characters, lone surrogates and unassigned code points carry no identity
    # and break downstream encoders (opencc encodes to UTF-8); whitespace is kept for collapsing.
    return "".join(ch for ch in text if ch.isprintable() or ch.isspace())


def nfkc(text: str | None) -> str:
    """NFKC, invisible characters dropped, outer whitespace stripped, inner runs collapsed to one
    space. None -> ""."""
    return _nfkc(_as_text(text))


@functools.lru_cache(maxsize=_CACHE)
def _nfkc(text: str | None) -> str:
    if not text:
        return ""
    # Removal must come before NFKC: dropping a format character can bring a base letter and a
    # combining mark together, which NFKC then composes.
    return " ".join(unicodedata.normalize("NFKC", _drop_invisible(text)).split())


_converter = None
_converter_lock = threading.Lock()


def _t2s():
    global _converter
    if _converter is None:
        with _converter_lock:
            if _converter is None:
                import opencc  # noqa: PLC0415 - keep DAG parsing free of native imports

                _converter = opencc.OpenCC("t2s")
    return _converter


def to_simplified(text: str) -> str:
    """Traditional -> simplified Chinese (opencc 't2s'); other text passes unchanged."""
    if not text or text.isascii():
        return text
    return _t2s().convert(_drop_invisible(text))


def _settle(clean: Callable[[str], str], text: str) -> str:
    # Unicode case mapping, NFKC and t2s are each idempotent, but their compositions are not
    # always; iterating to a fixed point is what makes the public functions idempotent.
    for _ in range(6):
        again = clean(text)
        if again == text:
            return text
        text = again
    return text


_HAN = (r"\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ebef"
        r"\U0002f800-\U0002fa1f\U00030000-\U0003134f")
_RE_HAN_CHAR = re.compile(f"[{_HAN}]")
_RE_SPACE_BETWEEN_HAN = re.compile(f"(?<=[{_HAN}])\\s+(?=[{_HAN}])")
_RE_SCRIPT_RUN = re.compile(f"[{_HAN}]+|[^{_HAN}]+")
_RE_ALNUM_RUN = re.compile(r"[^\W_]+")


def _script_runs(text: str) -> list[str]:
    """'张三Lee' -> ['张三', 'Lee']: alternating Han and non-Han runs, in order."""
    return _RE_SCRIPT_RUN.findall(text)


def _is_latin_letter(ch: str) -> bool:
    if ch.isascii():
        return ch.isalpha()
    return ch.isalpha() and unicodedata.name(ch, "").startswith("LATIN")


def _ascii_fold(text: str) -> str:
    # 'ü' is 'v' in pypinyin's toneless output (吕 -> lv), so map it before stripping marks.
    text = text.replace("ü", "v").replace("Ü", "v")
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()


# --------------------------------------------------------------------------- places

# Major cities: bare-prefix stripping in company names and area-code completion for phones.
# Kept short on purpose: stripping a bare prefix from a long list eats real names (中山大学,
# 黄山旅游). English names that are ambiguous (Suzhou 苏州/宿州, Fuzhou 福州/抚州) are left out.
_CITIES: dict[str, tuple[str | None, str]] = {
    "北京": ("beijing", "10"), "上海": ("shanghai", "21"), "天津": ("tianjin", "22"),
    "重庆": ("chongqing", "23"), "广州": ("guangzhou", "20"), "深圳": ("shenzhen", "755"),
    "杭州": ("hangzhou", "571"), "成都": ("chengdu", "28"), "南京": ("nanjing", "25"),
    "武汉": ("wuhan", "27"), "西安": ("xian", "29"), "沈阳": ("shenyang", "24"),
    "苏州": (None, "512"), "东莞": ("dongguan", "769"), "佛山": ("foshan", "757"),
    "宁波": ("ningbo", "574"), "青岛": ("qingdao", "532"), "厦门": ("xiamen", "592"),
    "大连": ("dalian", "411"), "长沙": ("changsha", "731"), "郑州": ("zhengzhou", "371"),
    "济南": ("jinan", "531"), "福州": (None, "591"), "合肥": ("hefei", "551"),
    "昆明": ("kunming", "871"), "哈尔滨": ("harbin", "451"), "长春": ("changchun", "431"),
    "石家庄": ("shijiazhuang", "311"), "太原": ("taiyuan", "351"), "南昌": ("nanchang", "791"),
    "南宁": ("nanning", "771"), "贵阳": ("guiyang", "851"), "兰州": ("lanzhou", "931"),
    "乌鲁木齐": ("urumqi", "991"), "呼和浩特": ("hohhot", "471"), "海口": ("haikou", "898"),
    "无锡": ("wuxi", "510"), "珠海": ("zhuhai", "756"), "温州": ("wenzhou", "577"),
    "常州": ("changzhou", "519"), "西宁": ("xining", "971"), "银川": ("yinchuan", "951"),
}
_PROVINCES = (
    "河北", "山西", "辽宁", "吉林", "黑龙江", "江苏", "浙江", "安徽", "福建", "江西", "山东", "河南",
    "湖北", "湖南", "广东", "海南", "四川", "贵州", "云南", "陕西", "甘肃", "青海", "台湾", "内蒙古",
    "广西", "西藏", "宁夏", "新疆", "香港", "澳门",
)
_PROVINCES_EN = (
    "hebei", "shanxi", "liaoning", "jilin", "heilongjiang", "jiangsu", "zhejiang", "anhui", "fujian",
    "jiangxi", "shandong", "henan", "hubei", "hunan", "guangdong", "hainan", "sichuan", "guizhou",
    "yunnan", "shaanxi", "gansu", "qinghai", "taiwan", "guangxi", "tibet", "ningxia", "xinjiang",
    "hongkong", "macau", "macao",
)
_CITY_BY_EN = {en: zh for zh, (en, _) in _CITIES.items() if en}
_PLACE_BY_EN = {**{p: p for p in _PROVINCES_EN}, **_CITY_BY_EN}
_PLACES_ZH = sorted({*_CITIES, *_PROVINCES}, key=len, reverse=True)
_ADMIN_SUFFIX = r"(?:维吾尔自治区|壮族自治区|回族自治区|特别行政区|自治区|省|市)"
_RE_PLACE_PREFIX = re.compile(f"^({'|'.join(_PLACES_ZH)})({_ADMIN_SUFFIX})?")
_RE_CITY_TEXT = re.compile(r"[^\w]|_")


def _city_text(city: str) -> str:
    """'广东省深圳市南山区' / 'Shenzhen City' / '深圳' -> '深圳' / 'shenzhen' (the lookup form)."""
    text = _RE_CITY_TEXT.sub("", to_simplified(nfkc(city)).lower())
    if "省" in text:
        text = text.split("省", 1)[1] or text
    if "市" in text:
        text = text.split("市", 1)[0] or text
    if text.endswith("city") and len(text) > 4:
        text = text[:-4]
    return text


_geo_index: dict[str, str] | None = None
_geo_lock = threading.Lock()
_RE_GEO_PROVINCE = re.compile(r"^.*?(?:省|自治区)|^(?:广西|内蒙古|云南|贵州|四川|西藏|新疆|宁夏)")


def _geocoder_index() -> dict[str, str]:
    """City name (zh or en) -> CN area code, read off phonenumbers' geocoder data.

    Loading that data costs seconds and ~180 MB (it holds the whole world), so it is only
    touched for a city the built-in table does not know, when a number actually needs its area
    code. Names that map to more than one area code are dropped: completing them would be a guess.
    """
    global _geo_index
    if _geo_index is not None:
        return _geo_index
    with _geo_lock:
        if _geo_index is not None:
            return _geo_index
        from phonenumbers.geodata import GEOCODE_DATA  # noqa: PLC0415 - heavy, see docstring

        found: dict[str, set[str]] = {}
        for prefix, names in GEOCODE_DATA.items():
            if not prefix.startswith("86"):
                continue
            code = prefix[2:]
            # area codes are 10, 2X or [3-9]XX; other prefixes of this shape are mobile ranges
            if not (code == "10" or re.fullmatch(r"2\d|[3-9]\d\d", code)):
                continue
            zh = _RE_GEO_PROVINCE.sub("", names.get("zh", ""))
            for part in re.split(r"[、,，/]", zh):
                for key in {part, part.removesuffix("市"), part.removesuffix("地区")}:
                    if key:
                        found.setdefault(key, set()).add(code)
            en = names.get("en", "").split(",", 1)[0]
            for part in en.split("/"):
                key = re.sub(r"[^a-z]", "", part.lower())
                if key:
                    found.setdefault(key, set()).add(code)
        _geo_index = {name: next(iter(codes)) for name, codes in found.items() if len(codes) == 1}
    return _geo_index


@functools.lru_cache(maxsize=4096)
def area_code_for_city(city: str | None) -> str | None:
    """CN area code for a city name ('北京', 'Beijing', '深圳市', '廣州') or None when unknown or
    ambiguous."""
    city = _as_text(city)
    if not city:
        return None
    text = _city_text(city)
    if not text:
        return None
    if text in _CITIES:
        return _CITIES[text][1]
    if text in _CITY_BY_EN:
        return _CITIES[_CITY_BY_EN[text]][1]
    return _geocoder_index().get(text)


# --------------------------------------------------------------------------- phone

@dataclass(frozen=True)
class Phone:
    raw: str | None
    e164: str | None        # '+8613800138000'; None when invalid or empty
    kind: str               # 'mobile' | 'landline' | 'other' | 'invalid' | 'empty'
    extension: str | None   # '123' for '010-87654321转123'
    region: str | None      # 'CN', 'HK', 'US', ...


_RE_EXTENSION = re.compile(
    r"\s*\(?\s*(?:转|轉|分机号?|分機號?|内线|內線|ext\.?|extension|x|#)\s*[:.]?\s*(\d{1,7})\s*\)?\s*$",
    re.IGNORECASE,
)
# '021-52173395-299': an extension written after a dash. Only tried when the whole text is not
# a valid number, and only kept when what precedes the dash is a complete, valid landline.
_RE_DASH_EXTENSION = re.compile(r"\s*[-‐‑‒–—]\s*(\d{1,6})\s*$")
# A complete landline names its area code: a trunk 0 (021 ...) or a country code (+86, 0086).
_RE_HAS_AREA_CODE = re.compile(r"^\s*(?:\+|\(\s*\+|\(?\s*0)")
_RE_PHONE_SPLIT = re.compile(r"[/;,、|\n\r]|或")
_RE_LOCAL_ONLY = re.compile(r"[2-9]\d{6,7}")
_RE_CN_MOBILE = re.compile(r"1[3-9]\d{9}")
# Most mobiles arrive as 11 ASCII digits, maybe after +86 / 0086, maybe grouped 3-4-4. For these
# phonenumbers.parse, the costliest step, can only return country code 86 and the digits with
# nothing else set (stripping a CN carrier code would leave 6 digits, too few, so it never
# applies), so `_parse` builds that number itself. Other digit scripts and spellings take the full
# parse; tests/test_normalize.py checks that both agree.
_RE_PLAIN_CN_MOBILE = re.compile(r"(?:\+86[ -]?|0086[ -]?)?(1[0-9]{2})[ -]?([0-9]{4})[ -]?([0-9]{4})")
_NULL_WORDS = frozenset({"none", "null", "nil", "na", "n/a", "无", "暂无", "空", "未知", "unknown"})
_KIND_RANK = {"mobile": 0, "landline": 1, "other": 2, "invalid": 3, "empty": 4}


def _is_blank(text: str) -> bool:
    return not any(ch.isalnum() for ch in text) or text.lower() in _NULL_WORDS


def _parse(text: str, region: str) -> tuple[phonenumbers.PhoneNumber, int] | None:
    """(number, its PhoneNumberType) when `text` is a valid number, else None."""
    plain = _RE_PLAIN_CN_MOBILE.fullmatch(text) if region == "CN" else None
    if plain:
        number = phonenumbers.PhoneNumber(country_code=86, national_number=int("".join(plain.groups())))
    else:
        try:
            number = phonenumbers.parse(text, region)
        except NumberParseException:
            return None
    # is_valid_number(n) is number_type(n) != UNKNOWN: both match n against the metadata of
    # region_code_for_number(n); is_valid_number's extra check that the region's country code is
    # n's can only fail for inconsistent metadata. Typing once halves the pattern matching.
    kind = phonenumbers.number_type(number)
    return None if kind == PhoneNumberType.UNKNOWN else (number, kind)


def _kind(number: phonenumbers.PhoneNumber, kind: int) -> str:
    if kind == PhoneNumberType.MOBILE:
        return "mobile"
    if kind == PhoneNumberType.FIXED_LINE:
        return "landline"
    if kind == PhoneNumberType.FIXED_LINE_OR_MOBILE:
        national = phonenumbers.national_significant_number(number)
        is_cn_mobile = number.country_code == 86 and _RE_CN_MOBILE.fullmatch(national)
        return "mobile" if is_cn_mobile else "landline"
    return "other"


def _dash_extension(text: str, default_region: str) -> tuple[tuple[phonenumbers.PhoneNumber, int] | None,
                                                              str | None, str]:
    """(parsed, extension, text) for 'AREA-NUMBER-EXT', `parsed` as `_parse` returns it;
    (None, None, text) unless the part before the last dash is a complete, valid landline with its
    area code. A bare local number or a mobile followed by '-299' is not split: which digits
    belong where would be a guess."""
    found = _RE_DASH_EXTENSION.search(text)
    if not found or found.start() == 0:
        return None, None, text
    main = text[: found.start()]
    if not _RE_HAS_AREA_CODE.match(main):
        return None, None, text
    parsed = _parse(main, default_region)
    if parsed is None or _kind(*parsed) != "landline":
        return None, None, text
    return parsed, found.group(1), main


def _one_phone(raw: str, city: str | None, default_region: str) -> Phone:
    text = raw
    if _is_blank(text):
        return Phone(raw, None, "empty", None, None)
    extension = None
    found = _RE_EXTENSION.search(text)
    if found and found.start() > 0:
        extension, text = found.group(1), text[: found.start()]
    parsed = _parse(text, default_region)
    if parsed is None and extension is None:
        parsed, extension, text = _dash_extension(text, default_region)
    if parsed is None and city and "+" not in text:
        digits = "".join(ch for ch in text if ch.isdigit())
        # Only a bare local number (7-8 digits, no trunk 0, not a mobile) may borrow the area code.
        area = area_code_for_city(city) if _RE_LOCAL_ONLY.fullmatch(digits) else None
        if area:
            parsed = _parse(f"0{area}{digits}", "CN")
            # the area code was borrowed for a landline; anything else it produced is an accident
            if parsed is not None and _kind(*parsed) != "landline":
                parsed = None
    if parsed is None:
        return Phone(raw, None, "invalid", extension, None)
    number = parsed[0]
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return Phone(raw, e164, _kind(*parsed), extension or number.extension or None,
                 phonenumbers.region_code_for_number(number))


@functools.lru_cache(maxsize=_CACHE)
def _normalize_phones(raw: str | None, city: str | None, default_region: str) -> tuple[Phone, ...]:
    if raw is None:
        return ()
    if _is_blank(nfkc(raw)):
        return ()
    return tuple(_one_phone(p, city, default_region) for p in _phone_parts(raw))


def _phone_parts(raw: str) -> list[str]:
    # NFKC before splitting so full-width separators (／ ； ，) split too; nfkc() would also
    # collapse the line breaks that separate numbers
    text = unicodedata.normalize("NFKC", _drop_invisible(raw))
    parts = [nfkc(p) for p in _RE_PHONE_SPLIT.split(text)]
    return [p for p in parts if p and not _is_blank(p)]


def phone_parts(raw: str | None) -> tuple[str, ...]:
    """The numbers a phone field holds, as text, in order (`Phone.raw` of `normalize_phones`):
    splitting only, nothing is parsed."""
    text = _as_text(raw)
    if text is None or _is_blank(nfkc(text)):
        return ()
    return tuple(_phone_parts(text))


def best_phone_part(raw: str | None, city: str | None = None, default_region: str = "CN") -> str | None:
    """The number of the field `normalize_phone` reports (`Phone.raw` of that part); None when the
    field holds none."""
    phones = normalize_phones(raw, city, default_region)
    if not phones:
        return None
    return min(phones, key=lambda p: _KIND_RANK[p.kind]).raw


@functools.lru_cache(maxsize=_CACHE)
def _normalize_phone(raw: str | None, city: str | None, default_region: str) -> Phone:
    if raw is None:
        return Phone(None, None, "empty", None, None)
    phones = _normalize_phones(raw, city, default_region)
    if not phones:
        return Phone(raw, None, "empty", None, None)
    if len(phones) == 1:
        only = phones[0]
        return Phone(raw, only.e164, only.kind, only.extension, only.region)
    # Several numbers in one field: report the strongest evidence; ties keep source order.
    best = min(phones, key=lambda p: _KIND_RANK[p.kind])
    return Phone(raw, best.e164, best.kind, best.extension, best.region)


def normalize_phones(raw: str | None, city: str | None = None, default_region: str = "CN") -> list[Phone]:
    """Every number in a field that may hold several ('138 0013 8000 / 010-87654321', separators
    / ; , ， 、 | 或 and line breaks). Each Phone's `raw` is its own part. Empty field -> []."""
    return list(_normalize_phones(_as_text(raw), _as_text(city), _as_text(default_region) or "CN"))


def normalize_phone(raw: str | None, city: str | None = None, default_region: str = "CN") -> Phone:
    """One phone field -> Phone. A bare local landline borrows the area code of `city`; a field
    holding several numbers yields the best of them (mobile > landline > other > invalid)."""
    return _normalize_phone(_as_text(raw), _as_text(city), _as_text(default_region) or "CN")


# --------------------------------------------------------------------------- e-mail

@dataclass(frozen=True)
class Email:
    raw: str | None
    email: str | None       # trimmed, NFKC, lower-cased; None when empty
    valid: bool             # syntactically valid local@domain.tld
    generic: bool           # role mailbox (info@, sales@ ...): weak evidence, shared by colleagues


_RE_EMAIL = re.compile(
    r"(?P<local>[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*)"
    r"@(?P<domain>(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+(?:[a-z]{2,63}|xn--[a-z0-9-]{1,59}))"
)
_RE_ANGLE_ADDR = re.compile(r"<([^<>]*@[^<>]*)>")
_RE_WS = re.compile(r"\s+")
_RE_LOCAL_SEPARATORS = re.compile(r"[._-]")
_EMAIL_TRIM = " \"'<>()[]{},;:.。"
_ROLE_MAILBOXES = frozenset({
    "info", "information", "sales", "sale", "service", "services", "customerservice", "support",
    "help", "helpdesk", "admin", "administrator", "contact", "contactus", "hr", "jobs", "job",
    "career", "careers", "recruit", "recruitment", "office", "noreply", "donotreply", "mail",
    "email", "webmaster", "postmaster", "hostmaster", "marketing", "market", "enquiry", "enquiries",
    "inquiry", "hello", "team", "billing", "finance", "accounts", "account", "invoice", "orders",
    "order", "business", "biz", "pr", "press", "media", "public", "reception", "feedback", "cs",
    "kefu", "fuwu", "zhaopin", "caiwu", "xiaoshou", "bangong",
})


def _clean_email(text: str) -> str:
    text = nfkc(text)[:_MAX_CHARS].lower()
    # IDNA treats these full stops as dots; users type them on Chinese keyboards
    text = text.replace("。", ".").replace("．", ".").replace("｡", ".")
    found = _RE_ANGLE_ADDR.search(text)
    if found:
        text = found.group(1)
    if text.startswith("mailto:"):
        text = text[len("mailto:"):]
    text = text.strip(_EMAIL_TRIM)
    # 'zhang @ qq.com' is an address typed with spaces; 'not an email' should stay readable
    compact = _RE_WS.sub("", text)
    return compact if _RE_EMAIL.fullmatch(compact) else text


@functools.lru_cache(maxsize=_CACHE)
def _normalize_email(raw: str | None) -> Email:
    if raw is None:
        return Email(None, None, False, False)
    email = _settle(_clean_email, raw)
    if not email:
        return Email(raw, None, False, False)
    found = _RE_EMAIL.fullmatch(email)
    valid = bool(found) and len(email) <= 254 and len(found.group("local")) <= 64
    generic = False
    if "@" in email:
        local = email.rsplit("@", 1)[0].split("+", 1)[0]
        generic = _RE_LOCAL_SEPARATORS.sub("", local) in _ROLE_MAILBOXES
    return Email(raw, email, valid, generic)


def normalize_email(raw: str | None) -> Email:
    """E-mail field -> Email. `email` is the cleaned text even when it is not valid, so
    validation can show what the source said."""
    return _normalize_email(_as_text(raw))


# --------------------------------------------------------------------------- pinyin

@functools.lru_cache(maxsize=1)
def pinyin_syllables() -> frozenset[str]:
    """Toneless pinyin syllables pypinyin can produce (from its own character dictionary).

    Interjection-only readings without a vowel (m, n, ng, hm) are left out: no name uses them and
    they would let segmentation split almost any Latin string.
    """
    from pypinyin.constants import PINYIN_DICT  # noqa: PLC0415
    from pypinyin.contrib.tone_convert import to_normal  # noqa: PLC0415

    # 1,549 distinct toned readings over 41,923 characters: each converted once (0.97 s -> 0.28 s,
    # paid by the first name of every resolve task)
    readings = {reading for joined in PINYIN_DICT.values() for reading in joined.split(",")}
    syllables = {to_normal(reading) for reading in readings}
    return frozenset(p for p in syllables if p.isascii() and p.isalpha() and any(v in p for v in "aeiouv"))


_MAX_SYLLABLE = 6
_MAX_SEGMENT = 64


@functools.lru_cache(maxsize=2**16)
def _segment(word: str) -> tuple[str, ...] | None:
    """'zhangsan' -> ('zhang', 'san'); None when the word is not a run of pinyin syllables.

    Longest syllable first with backtracking (plain greedy fails on 'xianu': xian|u is not pinyin,
    xia|nu is), and no syllable after the first may start with a vowel. Done as a DP from the right so a long word cannot blow the stack.
    """
    if not word or len(word) > _MAX_SEGMENT:
        return None
    syllables = pinyin_syllables()
    n = len(word)
    best: list[tuple[str, ...] | None] = [None] * (n + 1)
    best[n] = ()
    for i in range(n - 1, -1, -1):
        for size in range(min(_MAX_SYLLABLE, n - i), 0, -1):
            rest = best[i + size]
            # pinyin orthography: a syllable starting with a/o/e after another one needs an
            # apostrophe (xi'an), so without one 'nana' is na|na, never nan|a
            if rest and rest[0][0] in "aoe":
                continue
            if rest is not None and word[i:i + size] in syllables:
                best[i] = (word[i:i + size], *rest)
                break
    return best[0]


@functools.lru_cache(maxsize=2**16)
def _lazy_pinyin(text: str) -> tuple[str, ...]:
    # cached per run: given names and company words repeat far more than whole values do
    from pypinyin import Style, lazy_pinyin  # noqa: PLC0415

    return tuple(lazy_pinyin(text, style=Style.NORMAL, errors="ignore"))


# --------------------------------------------------------------------------- person name

@dataclass(frozen=True)
class Name:
    raw: str | None
    full: str               # cleaned name; "" when nothing is left
    surname: str | None     # '张' for 张三; 'zhang' for 'Zhang San'
    honorific: str | None   # '先生' etc. when one was removed
    surname_only: bool      # only a surname survived ('张先生', '王总'): a weak hint
    pinyin: str             # order-free key: toneless syllables, sorted, joined by ' '
    script: str             # 'han' | 'latin' | 'mixed' | 'empty'
    pinyin_tokens: tuple[str, ...] = ()   # the same syllables in name order


_HAN_TITLES = sorted((
    "先生", "女士", "小姐", "太太", "夫人", "总", "经理", "总经理", "副总", "总监", "老师", "教授",
    "博士", "医生", "大夫", "律师", "师傅", "老板", "主任", "董事长", "处长", "局长", "科长", "部长",
    "院长", "校长", "主管",
), key=len, reverse=True)
_RE_HAN_TITLE = re.compile(f"\\s*({'|'.join(_HAN_TITLES)})$")
_RE_LATIN_TITLE = re.compile(f"^(mrs|mr|ms|miss|mx|dr|prof)(?:\\.|(?=\\s)|(?=[{_HAN}])|$)\\s*",
                             re.IGNORECASE)
_LATIN_TITLE_FORM = {"mr": "Mr", "mrs": "Mrs", "ms": "Ms", "miss": "Miss", "mx": "Mx", "dr": "Dr",
                     "prof": "Prof"}

_COMPOUND_SURNAMES = (
    "欧阳", "司马", "诸葛", "上官", "东方", "皇甫", "尉迟", "公孙", "慕容", "令狐", "长孙", "宇文",
    "司徒", "夏侯", "轩辕", "端木", "独孤", "南宫", "西门", "百里", "呼延", "赫连", "澹台", "太史",
    "申屠", "闻人", "万俟", "钟离", "宗政", "濮阳", "淳于", "单于", "公冶", "鲜于", "司空", "左丘",
)
_COMMON_SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁"
    "任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武"
    "戴莫孔向汤常温康施文牛樊葛邢安齐易乔伍庞颜倪庄聂章鲁岳翟殷詹申欧耿关兰焦俞左柳甘祝包宁尚符舒阮"
    "柯纪梅童凌毕单季裴霍涂成苗谷盛曲翁冉骆蓝路游辛靳管柴蒙鲍华喻祁蒲房滕屈饶解牟艾尤阳时穆农司卓古"
    "吉缪简车项连芦麦褚娄窦戚岑景党宫费卜冷晏席卫米柏宗瞿桂全佟应臧闵苟邬边卞姬师和仇栾隋商刁沙荣巫"
    "寇桑郎甄丛仲虞敖巩明佘池查麻苑迟邝官封谈匡鞠惠荆乐冀郁胥南班储原栗燕楚鄢劳谌奚皮粟冼蔺楼盘满闻"
    "位厉伊仝区郜海阚花权强帅屠豆朴盖练廉禹井祖漆巴丰支卿国狄平计索宣晋相初门云容敬来扈晁芮都普阙浦"
    "戈伏鹿薄邸雍辜羊阿乌母裘亓修邰赫杭况那宿鲜印逯隆茹诸战慕危玉银亢嵇公哈湛宾戎勾茅利於呼居揭干但"
    "尉冶斯元束檀衣信展阴昝智幸奉植衡富尧闭由"
)
# pypinyin has no surname mode; these are the polyphonic characters whose surname reading differs
# from its default (曾 zeng, not ceng).
_SURNAME_READINGS = {
    "曾": "zeng", "单": "shan", "解": "xie", "仇": "qiu", "区": "ou", "朴": "piao", "查": "zha",
    "覃": "qin", "翟": "zhai", "乐": "yue", "缪": "miao", "盖": "ge", "黑": "he", "尉": "wei",
    "繁": "po", "秘": "bi", "召": "shao", "种": "chong", "员": "yun", "句": "gou", "能": "nai",
    "隗": "wei", "长": "chang", "万": "wan", "尉迟": "yu chi", "万俟": "mo qi", "单于": "chan yu",
    "长孙": "zhang sun", "澹台": "tan tai",
}


_COMPOUND_SURNAME_SET = frozenset(_COMPOUND_SURNAMES)


def _han_surname(han: str) -> str:
    return han[:2] if han[:2] in _COMPOUND_SURNAME_SET else han[:1]


def _han_pinyin(han: str, with_surname: bool) -> tuple[str, ...]:
    if not with_surname:
        return _lazy_pinyin(han)
    surname = _han_surname(han)
    reading = _SURNAME_READINGS.get(surname)
    head = tuple(reading.split()) if reading else _lazy_pinyin(surname)
    return head + _lazy_pinyin(han[len(surname):])


@functools.lru_cache(maxsize=1)
def _surname_pinyin() -> tuple[frozenset[str], frozenset[str]]:
    """(single-syllable surname readings, compound surname readings joined without spaces)."""
    single = {_SURNAME_READINGS.get(ch) or "".join(_lazy_pinyin(ch)) for ch in _COMMON_SURNAMES}
    compound = {"".join(_han_pinyin(c, True)) for c in _COMPOUND_SURNAMES}
    return frozenset(s for s in single if s), frozenset(compound)


_RE_NOT_ASCII_LETTER = re.compile(r"[^a-z]+")


def _latin_words(text: str) -> list[str]:
    return [w for w in _RE_NOT_ASCII_LETTER.split(_ascii_fold(text)) if w]


@functools.lru_cache(maxsize=1)
def _surname_rank() -> dict[str, int]:
    """Surname reading -> rank of its most common character (`_COMMON_SURNAMES` is by frequency)."""
    rank: dict[str, int] = {}
    for position, ch in enumerate(_COMMON_SURNAMES):
        rank.setdefault(_SURNAME_READINGS.get(ch) or "".join(_lazy_pinyin(ch)), position)
    for c in _COMPOUND_SURNAMES:
        rank.setdefault("".join(_han_pinyin(c, True)), len(_COMMON_SURNAMES))
    return rank


def _latin_surname(words: list[str]) -> str | None:
    single, compound = _surname_pinyin()
    if len(words) > 1:
        # 'Hao Wang' and 'Wang Hao' both occur (Western order on English forms); when both ends
        # read as surnames, the far more common one is the surname: wang (王), not hao (郝)
        found = [w for w in (words[0], words[-1]) if w in single or w in compound]
        rank = _surname_rank()
        return min(found, key=lambda w: rank.get(w, len(rank))) if found else None
    if not words:
        return None
    word = words[0]
    if word in single or word in compound:
        return word
    syllables = _segment(word) or ()
    if len(syllables) >= 2 and syllables[0] + syllables[1] in compound:
        return syllables[0] + syllables[1]
    if syllables and syllables[0] in single:
        return syllables[0]
    return None


def _clean_name(text: str) -> str:
    text = _RE_SPACE_BETWEEN_HAN.sub("", to_simplified(nfkc(text)[:_MAX_CHARS]))
    while True:
        before = text
        found = _RE_LATIN_TITLE.match(text)
        if found:
            text = text[found.end():]
        found = _RE_HAN_TITLE.search(text)
        if found:
            text = text[: found.start()]
        text = text.strip()
        if text == before:
            return text


def _first_honorific(text: str) -> str | None:
    """The title `_clean_name` removes first: the outermost Latin prefix or Han suffix."""
    text = _RE_SPACE_BETWEEN_HAN.sub("", to_simplified(nfkc(text)[:_MAX_CHARS]))
    found = _RE_LATIN_TITLE.match(text)
    if found:
        return _LATIN_TITLE_FORM[found.group(1).lower()]
    found = _RE_HAN_TITLE.search(text)
    return found.group(1) if found else None


def _script(full: str) -> str:
    if not full:
        return "empty"
    has_han = has_latin = has_other = False
    for ch in full:
        if _RE_HAN_CHAR.match(ch):
            has_han = True
        elif _is_latin_letter(ch):
            has_latin = True
        elif ch.isalpha():
            has_other = True
    if has_han and not (has_latin or has_other):
        return "han"
    if has_latin and not (has_han or has_other):
        return "latin"
    return "mixed"


@functools.lru_cache(maxsize=_CACHE)
def _normalize_person_name(raw: str | None) -> Name:
    if raw is None:
        return Name(None, "", None, None, False, "", "empty")
    full = _settle(_clean_name, raw)
    honorific = _first_honorific(raw) if full != nfkc(raw) else None
    if not full:
        return Name(raw, "", None, honorific, False, "", "empty", ())
    script = _script(full)

    tokens: list[str] = []
    surname: str | None = None
    surname_only = False
    starts_han = bool(_RE_HAN_CHAR.match(full))
    if starts_han:
        surname = _han_surname(full)
        surname_only = full == surname
    # Walk the name in order: Han runs read with pypinyin (surname reading for the leading run),
    # Latin runs segmented into syllables so 'zhangsan' and 'Zhang San' give the same tokens.
    latin_words: list[str] = []
    for index, chunk in enumerate(_script_runs(full)):
        if _RE_HAN_CHAR.match(chunk):
            tokens.extend(_han_pinyin(chunk, with_surname=index == 0))
        else:
            for word in _latin_words(chunk):
                latin_words.append(word)
                tokens.extend(_segment(word) or (word,))
    if not starts_han:
        surname = _latin_surname(latin_words)
        surname_only = surname is not None and latin_words == [surname]
    return Name(raw, full, surname, honorific, surname_only, " ".join(sorted(tokens)), script,
                tuple(tokens))


def normalize_person_name(raw: str | None) -> Name:
    """Person name -> Name: NFKC, traditional -> simplified, spaces between Han characters removed,
    honorifics and titles stripped ('张先生' -> '张', 'Mr. Zhang' -> 'Zhang'). The `pinyin` key is
    the same for '张三', 'Zhang San', 'San Zhang', 'zhangsan' and 'ZHANG San'."""
    return _normalize_person_name(_as_text(raw))


# --------------------------------------------------------------------------- company

@dataclass(frozen=True)
class Company:
    raw: str | None
    key: str          # comparison key (see normalize_company)
    city: str | None  # city (or province) named in a prefix or in brackets
    pinyin: str       # toneless pinyin of the key, letters and digits only


_HAN_LEGAL_FORMS = ("股份有限公司", "有限责任公司", "有限公司", "责任公司", "股份公司", "集团", "公司")
_RE_HAN_LEGAL_FORM = re.compile(f"({'|'.join(_HAN_LEGAL_FORMS)})$")
_LATIN_LEGAL_FORMS = frozenset({
    "co", "company", "ltd", "limited", "inc", "incorporated", "llc", "corp", "corporation", "gmbh",
    "plc", "group", "holdings", "pte",
})
_RE_BRACKET = re.compile(r"[(\[【〔［]([^()\[\]【】〔〕［］]*)[)\]】〕］]")
_BRACKET_REGIONS = frozenset({"中国", "china", "中国大陆", "prc"})


def _bracket_place(content: str) -> tuple[bool, str | None]:
    """(is a place to drop, city to report) for the text inside one pair of brackets."""
    text = _RE_CITY_TEXT.sub("", content)
    if text in _BRACKET_REGIONS:
        return True, None
    found = _RE_PLACE_PREFIX.fullmatch(text)
    if found:
        return True, found.group(1)
    if text in _PLACE_BY_EN:
        return True, _PLACE_BY_EN[text]
    return False, None


def _company_parts(text: str) -> tuple[str, str | None]:
    text = to_simplified(nfkc(text)[:_MAX_CHARS]).lower()
    city: str | None = None

    def drop_place(found: re.Match) -> str:
        nonlocal city
        is_place, place = _bracket_place(found.group(1))
        if is_place:
            city = city or place
            return " "
        return f" {found.group(1)} "

    text = _RE_BRACKET.sub(drop_place, text)
    tokens = _RE_ALNUM_RUN.findall(text)
    while len(tokens) > 1 and tokens[-1] in _LATIN_LEGAL_FORMS:
        tokens.pop()
    # A leading English place name goes only when two words remain: 'Beijing Bank' stays itself.
    if len(tokens) > 2 and tokens[0] in _PLACE_BY_EN:
        city = city or _PLACE_BY_EN[tokens.pop(0)]
    key = "".join(tokens)
    while True:
        before = key
        found = _RE_HAN_LEGAL_FORM.search(key)
        if found and found.start() > 0:
            key = key[: found.start()]
        found = _RE_PLACE_PREFIX.match(key)
        # '深圳市腾讯' names its city explicitly; a bare '上海银行' is the bank's own name, so a bare
        # place is only dropped when at least three characters remain.
        if found and len(key) - found.end() >= (2 if found.group(2) else 3):
            if found.group(1) in _CITIES or city is None:
                city = found.group(1)
            key = key[found.end():]
        if key == before:
            return key, city


@functools.lru_cache(maxsize=_CACHE)
def _normalize_company(raw: str | None) -> Company:
    if raw is None:
        return Company(None, "", None, "")
    key, city = _company_parts(raw)
    key = _settle(lambda k: _company_parts(k)[0], key)
    if not key:
        return Company(raw, "", city, "")
    # Han runs are read as whole runs so phrase readings apply (银行 -> yinhang, not yinxing).
    parts = ("".join(_lazy_pinyin(run)) if _RE_HAN_CHAR.match(run) else run for run in _script_runs(key))
    pinyin = "".join(_RE_ALNUM_RUN.findall(_ascii_fold("".join(parts))))
    return Company(raw, key, city, pinyin)


def normalize_company(raw: str | None) -> Company:
    """Company name -> Company. The key is NFKC, simplified, lower-cased, without legal-form
    suffixes (有限公司, 集团, Co., Ltd., Inc., GmbH ...), without a leading or bracketed place
    ('深圳市…', '…（深圳）有限公司'), without punctuation and spaces: 深圳市腾讯计算机系统有限公司,
    腾讯计算机系统（深圳）有限公司 and 騰訊計算機系統有限公司 all give '腾讯计算机系统'."""
    return _normalize_company(_as_text(raw))
