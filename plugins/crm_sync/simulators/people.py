"""A seeded pool of true persons and the messy ways source systems write them down.

Guarantees:
- `generate_people(n, seed)` returns the same `n` persons for the same seed, in the same order,
  using only its own `random.Random` (never the global one). Every person has a unique
  `person_id` and a unique mobile number; the name, landline and email are deliberately *not*
  unique: surnames follow the real skew (王/李/张/刘/陈 dominate), several different people are
  called 王伟 or 李娜, colleagues share their company's switchboard (with different extensions),
  and some share the company's generic `info@` mailbox (every other address is personal and
  unique). That is what makes identity resolution hard.
- `render_name`, `render_phone` and `render_email` turn one true value into one of the spellings
  a clerk or a web form would produce. They draw only from the `rng` passed in, so a source
  seeded with a fixed seed renders the same noise every time.
- `render_phone` may return None (not captured) or an invalid, too-short number: sources do.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

# Rough share of the 30 most common surnames (per mille of the population, rounded);
# the head is heavy on purpose so that blocking on surname alone is useless.
SURNAME_WEIGHTS: dict[str, int] = {
    "王": 72, "李": 72, "张": 68, "刘": 54, "陈": 46, "杨": 32, "黄": 23, "赵": 22, "吴": 20, "周": 19,
    "徐": 15, "孙": 14, "马": 13, "朱": 12, "胡": 12, "郭": 11, "何": 11, "高": 10, "林": 10, "罗": 9,
    "郑": 9, "梁": 9, "谢": 8, "宋": 7, "唐": 7, "许": 6, "韩": 6, "冯": 6, "邓": 6, "曹": 6,
}

# Given names that millions share; drawn often so that full-name collisions (王伟, 张伟, 李娜) happen.
COMMON_GIVEN: dict[str, tuple[str, ...]] = {
    "M": ("伟", "强", "磊", "军", "洋", "勇", "杰", "涛", "明", "超", "刚", "平", "辉", "鹏", "波"),
    "F": ("芳", "娜", "敏", "静", "丽", "艳", "娟", "霞", "秀英", "桂英", "玲", "婷", "燕", "红", "丹"),
}
GIVEN_CHARS: dict[str, str] = {
    "M": "建国华文明志强永德海东晓春宇浩俊博涛斌鑫鹏嘉子轩航凯峰宏亮成",
    "F": "秀丽美玉雪梅兰晓彤欣怡佳雨婷静思悦琳莹慧颖倩露蕾晶璐薇",
}

CITIES: dict[str, str] = {  # city -> area code
    "北京": "010", "上海": "021", "广州": "020", "深圳": "0755", "杭州": "0571", "成都": "028",
    "武汉": "027", "南京": "025", "西安": "029", "重庆": "023", "天津": "022", "苏州": "0512",
}

_COMPANY_WORDS = ("华信", "东方", "远景", "瑞达", "恒通", "金盛", "宏图", "新创", "博远", "中科", "天和", "鼎泰",
                  "汇丰", "长城", "海纳", "启明", "云帆", "星河", "安泰", "众合")
_COMPANY_KINDS = (("科技", "tech"), ("贸易", "trade"), ("物流", "logistics"), ("电子", "elec"),
                  ("咨询", "consulting"), ("医疗器械", "med"), ("建材", "build"), ("软件", "soft"))
_MOBILE_PREFIXES = ("130", "131", "132", "133", "135", "136", "137", "138", "139", "150", "151", "152",
                    "155", "156", "157", "158", "159", "166", "177", "180", "181", "186", "187", "188",
                    "189", "198", "199")
_FREE_MAIL = ("163.com", "126.com", "qq.com", "sina.com", "gmail.com", "outlook.com")

NAME_VARIANTS = ("plain", "honorific", "traditional", "pinyin", "spaced")
PHONE_VARIANTS = ("plain", "intl_spaced", "intl_00", "intl_bare", "dashed", "intl_paren", "fullwidth",
                  "missing", "invalid")
LANDLINE_VARIANTS = ("plain", "ext_zhuan", "paren_ext", "compact", "missing", "invalid")


@dataclass(frozen=True)
class Company:
    name: str
    domain: str
    city: str
    switchboard: str  # "010-87654321"


@dataclass(frozen=True)
class Person:
    """One true human being; sources only ever see renderings of these fields."""

    person_id: str
    name: str                    # canonical, simplified characters: "王伟"
    surname: str
    given_name: str
    gender: str                  # "M" / "F"
    mobile: str                  # 11 digits, unique across the pool
    landline: str | None         # "010-87654321"; shared when it is the company switchboard
    extension: str | None        # switchboard extension, "123"
    email: str                   # may be the company's shared "info@" mailbox
    company: str
    city: str


def _pinyin(text: str) -> list[str]:
    from pypinyin import lazy_pinyin

    return lazy_pinyin(text)


@lru_cache(maxsize=1)
def _s2t():
    import opencc

    return opencc.OpenCC("s2t")


def to_traditional(text: str) -> str:
    return _s2t().convert(text)


def _companies(rng: random.Random, count: int) -> list[Company]:
    # there are only so many distinct "city + word + kind" names: a big pool shares them out
    count = min(count, len(CITIES) * len(_COMPANY_WORDS) * len(_COMPANY_KINDS))
    companies: list[Company] = []
    seen: set[str] = set()
    while len(companies) < count:
        city = rng.choice(list(CITIES))
        word = rng.choice(_COMPANY_WORDS)
        kind, kind_en = rng.choice(_COMPANY_KINDS)
        name = f"{city}{word}{kind}有限公司"
        if name in seen:
            continue
        seen.add(name)
        domain = f"{''.join(_pinyin(word))}-{kind_en}.com.cn"
        switchboard = f"{CITIES[city]}-{rng.randint(5, 8)}{rng.randint(0, 9_999_999):07d}"
        companies.append(Company(name, domain, city, switchboard))
    return companies


def _given_name(rng: random.Random, gender: str) -> str:
    if rng.random() < 0.45:
        return rng.choice(COMMON_GIVEN[gender])
    chars = GIVEN_CHARS[gender]
    if rng.random() < 0.3:
        return rng.choice(chars)
    return rng.choice(chars) + rng.choice(chars)


def generate_people(n: int, seed: int, *, id_prefix: str = "p") -> list[Person]:
    """Return `n` persons, identical for identical (`n`, `seed`, `id_prefix`)."""
    rng = random.Random(seed)
    companies = _companies(rng, max(3, n // 12))
    surnames, weights = list(SURNAME_WEIGHTS), list(SURNAME_WEIGHTS.values())
    used_mobiles: set[str] = set()
    used_extensions: dict[str, set[str]] = {}
    used_emails: set[str] = set()
    people: list[Person] = []
    for i in range(n):
        gender = rng.choice("MF")
        surname = rng.choices(surnames, weights)[0]
        given = _given_name(rng, gender)
        while True:
            mobile = rng.choice(_MOBILE_PREFIXES) + f"{rng.randint(0, 99_999_999):08d}"
            if mobile not in used_mobiles:
                used_mobiles.add(mobile)
                break
        company = rng.choice(companies)
        city = company.city if rng.random() < 0.85 else rng.choice(list(CITIES))
        landline = extension = None
        kind = rng.random()
        if kind < 0.35:
            landline = company.switchboard
            taken = used_extensions.setdefault(landline, set())
            while (extension := str(rng.randint(100, 899))) in taken:
                pass
            taken.add(extension)
        elif kind < 0.55:
            landline = f"{CITIES[city]}-{rng.randint(5, 8)}{rng.randint(0, 9_999_999):07d}"
        sur_py, given_py = "".join(_pinyin(surname)), "".join(_pinyin(given))
        mail = rng.random()
        if mail < 0.12:
            email = f"info@{company.domain}"
        else:
            # Personal mailboxes are unique: the second 王伟 at a company gets wei.wang2@.
            if mail < 0.55:
                local, domain = f"{given_py}.{sur_py}", company.domain
            else:
                local, domain = f"{sur_py}{given_py}{rng.randint(1, 999)}", rng.choice(_FREE_MAIL)
            email, suffix = f"{local}@{domain}", 1
            while email in used_emails:
                suffix += 1
                email = f"{local}{suffix}@{domain}"
            used_emails.add(email)
        people.append(Person(
            person_id=f"{id_prefix}-{i + 1:06d}", name=surname + given, surname=surname, given_name=given,
            gender=gender, mobile=mobile, landline=landline, extension=extension, email=email,
            company=company.name, city=city,
        ))
    return people


def render_name(person: Person, rng: random.Random, variant: str | None = None) -> str:
    """One spelling of `person.name`; `variant` (one of NAME_VARIANTS) forces the kind."""
    variant = variant or rng.choices(NAME_VARIANTS, (55, 15, 12, 12, 6))[0]
    if variant == "honorific":
        title = "先生" if person.gender == "M" else "女士"
        return rng.choice((person.surname + title, person.name + title, person.surname + "总",
                           person.name + " " + title))
    if variant == "traditional":
        return to_traditional(person.name)
    if variant == "pinyin":
        sur = "".join(_pinyin(person.surname)).capitalize()
        given = "".join(_pinyin(person.given_name)).capitalize()
        return rng.choice((f"{sur} {given}", f"{given} {sur}", (sur + given).lower(), f"{sur.upper()} {given}"))
    if variant == "spaced":
        return person.surname + " " + person.given_name if rng.random() < 0.7 else " ".join(person.name)
    return person.name if rng.random() < 0.9 else f" {person.name} "


_FULLWIDTH = str.maketrans("0123456789+-()", "０１２３４５６７８９＋－（）")


def _render_mobile(m: str, rng: random.Random, variant: str) -> str | None:
    if variant == "missing":
        return None
    if variant == "invalid":
        return m[: rng.randint(5, 8)]
    grouped = f"{m[:3]} {m[3:7]} {m[7:]}"
    return {
        "plain": m,
        "intl_spaced": f"+86 {grouped}",
        "intl_00": f"0086-{m}",
        "intl_bare": f"86 {m}",
        "dashed": f"{m[:3]}-{m[3:7]}-{m[7:]}",
        "intl_paren": f"(+86){m}",
        "fullwidth": m.translate(_FULLWIDTH) if rng.random() < 0.5 else grouped.translate(_FULLWIDTH),
    }[variant]


def _render_landline(phone: str, extension: str | None, rng: random.Random, variant: str) -> str | None:
    if variant == "missing":
        return None
    area, number = phone.split("-", 1)
    if variant == "invalid":
        return number[: rng.randint(3, 5)]
    if variant == "ext_zhuan" and extension:
        return f"{area}-{number}转{extension}"
    if variant == "paren_ext" and extension:
        return f"({area}){number} ext {extension}"
    if variant == "paren_ext":
        return f"({area}){number}"
    if variant == "compact":
        return area + number
    if extension and rng.random() < 0.5:
        return f"{area}-{number}-{extension}"
    return f"{area}-{number}"


def render_phone(phone: str | None, rng: random.Random, *, extension: str | None = None,
                 variant: str | None = None) -> str | None:
    """One spelling of a mobile ("13800138000") or landline ("010-87654321", optional extension).

    About 6% come back missing and 2% invalid (too short), as in the real feeds.
    """
    if phone is None:
        return None
    if "-" in phone:
        variant = variant or rng.choices(LANDLINE_VARIANTS, (35, 25, 15, 17, 6, 2))[0]
        return _render_landline(phone, extension, rng, variant)
    variant = variant or rng.choices(PHONE_VARIANTS, (28, 14, 8, 8, 12, 8, 14, 6, 2))[0]
    return _render_mobile(phone, rng, variant)


def render_email(email: str, rng: random.Random) -> str | None:
    """The email with the case and whitespace noise that web forms let through; 5% missing."""
    roll = rng.random()
    if roll < 0.05:
        return None
    if roll < 0.20:
        return email.upper() if rng.random() < 0.3 else email[0].upper() + email[1:]
    if roll < 0.30:
        return rng.choice((" ", "  ", "\t")) + email + rng.choice(("", " "))
    return email
