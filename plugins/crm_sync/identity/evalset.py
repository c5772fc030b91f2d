"""A labelled evaluation set of messy, multi-source Chinese customer records.

`generate(n_people, seed)` returns a DataFrame with columns
`record_id, source, name, phone, email, company, city, person_id` (all strings or None), where
`person_id` is the truth label and must never be given to the engine. Guarantees:
- deterministic for (`n_people`, `seed`): one private `random.Random`, persons from
  `simulators.people.generate_people`, spellings from its `render_*` functions;
- each person appears in 1–6 records drawn from five sources that capture different things the
  way real systems do: ERP (full names, mobiles, company), call center (honorifics, landlines
  with extensions, few e-mails), IM (pinyin and traditional names, mobiles), ticketing (e-mails,
  company), spreadsheet (pinyin, partial everything); every name, phone, e-mail, company and
  city spelling variant occurs, and so do missing and invalid values;
- the hard negatives come from the people pool and are kept: different persons sharing a common
  name (王伟, 李娜), colleagues sharing a company switchboard and a role `info@` mailbox;
- keying errors happen as in real feeds (`TYPO_RATE` of the values of each kind): a given-name
  character replaced by a homophone (what a pinyin input method produces: 张伟 -> 张维) or, when
  there is none, by another character; a letter dropped from a pinyin name; two adjacent digits of
  a mobile swapped or one digit mistyped; a letter dropped from an e-mail's local part;
- record order and record ids carry no information about the person (shuffled, sequential ids).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import pandas as pd

from crm_sync.simulators.people import (
    CITIES, COMMON_GIVEN, GIVEN_CHARS, NAME_VARIANTS, Person, generate_people, render_email, render_name, render_phone, to_traditional,
)

COLUMNS = ["record_id", "source", "name", "phone", "email", "company", "city", "person_id"]


@dataclass(frozen=True)
class SourceProfile:
    """What one source system captures, and how it spells names."""

    weight: int
    name_variants: tuple[int, ...]   # weights over people.NAME_VARIANTS
    mobile: float                    # share of records whose phone is the mobile
    landline: float                  # share whose phone is the landline (when the person has one)
    email: float
    company: float
    city: float


# NAME_VARIANTS = ("plain", "honorific", "traditional", "pinyin", "spaced")
SOURCES: dict[str, SourceProfile] = {
    # ERP: the account's mobile and company, often an e-mail
    "erp": SourceProfile(30, (70, 5, 10, 5, 10), 0.85, 0.10, 0.70, 0.95, 0.90),
    # call center: the number the customer called from (caller id), honorifics typed by agents
    "callcenter": SourceProfile(20, (45, 45, 0, 0, 10), 0.65, 0.35, 0.10, 0.30, 0.50),
    # IM: accounts are bound to a mobile; names as the user typed them
    "im": SourceProfile(20, (50, 0, 15, 25, 10), 0.95, 0.0, 0.30, 0.10, 0.20),
    # ticketing: tickets arrive by e-mail
    "ticketing": SourceProfile(20, (60, 20, 10, 10, 0), 0.45, 0.30, 0.95, 0.70, 0.40),
    # spreadsheet: whatever a sales rep wrote down
    "spreadsheet": SourceProfile(10, (40, 10, 0, 40, 10), 0.70, 0.10, 0.60, 0.60, 0.60),
}
_RECORDS_PER_PERSON = ((1, 2, 3, 4, 5, 6), (18, 24, 24, 16, 11, 7))
TYPO_RATE = 0.03
# Characters a pinyin input method offers for the same syllable: the pool that homophone typos
# are drawn from (given-name characters of the people pool and common characters beside them).
_HOMOPHONE_POOL = (GIVEN_CHARS["M"] + GIVEN_CHARS["F"] + "".join(COMMON_GIVEN["M"] + COMMON_GIVEN["F"])
                   + "维玮薇蔚卫为炜伟巍威微未位魏娟鹃涓军君钧均俊骏峻浚竣丽莉力立利历励黎李理礼里"
                     "静婧靖敬镜晶京精经菁明铭名鸣茗敏闽民珉闵华桦骅化画桂贵国果芳方昉舫磊蕾垒雷"
                     "强蔷墙羌洋阳杨扬烊勇永咏泳涛韬滔焘超潮朝巢刚钢岗纲平萍苹凭辉晖徽慧惠")


@lru_cache(maxsize=1)
def _homophones() -> dict[str, tuple[str, ...]]:
    from pypinyin import lazy_pinyin

    by_sound: dict[str, list[str]] = {}
    for ch in dict.fromkeys(_HOMOPHONE_POOL):
        by_sound.setdefault(lazy_pinyin(ch)[0], []).append(ch)
    return {ch: tuple(o for o in chars if o != ch) for chars in by_sound.values() for ch in chars}


def _name_typo(name: str, person: Person, rng: random.Random) -> str:
    positions = [k for k, ch in enumerate(name) if ch in person.given_name or ch in to_traditional(person.given_name)]
    if positions:
        k = rng.choice(positions)
        options = _homophones().get(name[k]) or tuple(GIVEN_CHARS[person.gender])
        return name[:k] + rng.choice(options) + name[k + 1:]
    letters = [k for k, ch in enumerate(name) if ch.isascii() and ch.isalpha()]
    if len(letters) > 4:
        k = rng.choice(letters[1:])
        return name[:k] + name[k + 1:]
    return name


def _digit_typo(phone: str, rng: random.Random) -> str:
    digits = [k for k, ch in enumerate(phone) if ch.isdigit() and ch.isascii()]
    if len(digits) < 11:
        return phone
    # never the mobile prefix: a typo there makes no number at all, not a wrong one
    tail = digits[-8:]
    chars = list(phone)
    if rng.random() < 0.5:
        k = rng.randrange(len(tail) - 1)
        a, b = tail[k], tail[k + 1]
        chars[a], chars[b] = chars[b], chars[a]
    else:
        k = rng.choice(tail)
        chars[k] = rng.choice([d for d in "0123456789" if d != chars[k]])
    return "".join(chars)


def _email_typo(email: str, rng: random.Random) -> str:
    at = email.find("@")
    if at < 3:
        return email
    k = rng.randrange(1, at)
    return email[:k] + email[k + 1:]


def _company(name: str, city: str, rng: random.Random) -> str:
    base = name.removesuffix("有限公司")
    core = base.removeprefix(city)
    return rng.choices((
        name,                                   # 北京华信科技有限公司
        base,                                   # 北京华信科技
        f"{core}（{city}）有限公司",              # 华信科技（北京）有限公司
        f"{city}市{core}有限公司",                # 北京市华信科技有限公司
        to_traditional(name),                   # 北京華信科技有限公司
        core + "有限责任公司",
    ), (40, 15, 10, 10, 15, 10))[0]


def _city(city: str, rng: random.Random) -> str:
    return rng.choices((city, city + "市", f" {city} "), (75, 20, 5))[0]


def _record(person: Person, source: str, rng: random.Random) -> dict[str, str | None]:
    profile = SOURCES[source]
    variant = rng.choices(NAME_VARIANTS, profile.name_variants)[0]
    name = render_name(person, rng, variant)
    roll = rng.random()
    captured_phone = roll < profile.mobile + profile.landline
    captured_email = rng.random() < profile.email
    if not (captured_phone or captured_email):
        # a customer record is kept because it has a way to reach the person; the rendering
        # below may still lose or garble it, as real feeds do
        captured_phone, roll = True, rng.random() * (profile.mobile + profile.landline)
    if captured_phone and roll < profile.mobile:
        phone = render_phone(person.mobile, rng)
    elif captured_phone and person.landline:
        phone = render_phone(person.landline, rng, extension=person.extension)
    elif captured_phone:
        phone = render_phone(person.mobile, rng)
    else:
        phone = None
    if name and rng.random() < TYPO_RATE:
        name = _name_typo(name, person, rng)
    if phone and phone.strip() and person.mobile in "".join(ch for ch in phone if ch.isdigit()) \
            and rng.random() < TYPO_RATE:
        phone = _digit_typo(phone, rng)
    email = render_email(person.email, rng) if captured_email else None
    if email and rng.random() < TYPO_RATE:
        email = _email_typo(email, rng)
    company_city = person.company[:2] if person.company[:2] in CITIES else person.city
    return {
        "source": source,
        "name": name,
        "phone": phone,
        "email": email,
        "company": _company(person.company, company_city, rng) if rng.random() < profile.company else None,
        "city": _city(person.city, rng) if rng.random() < profile.city else None,
        "person_id": person.person_id,
    }


def generate(n_people: int, seed: int) -> pd.DataFrame:
    """Labelled messy records for `n_people` persons (about 2.9 records each)."""
    rng = random.Random(seed)
    people = generate_people(n_people, seed)
    names, weights = list(SOURCES), [p.weight for p in SOURCES.values()]
    rows = []
    for person in people:
        count = rng.choices(*_RECORDS_PER_PERSON)[0]
        for source in rng.choices(names, weights, k=count):
            rows.append(_record(person, source, rng))
    rng.shuffle(rows)
    frame = pd.DataFrame(rows)
    frame.insert(0, "record_id", [f"r{i:07d}" for i in range(1, len(frame) + 1)])
    return frame[COLUMNS]


def generate_records(n_records: int, seed: int) -> pd.DataFrame:
    """About `n_records` records (persons scaled to the average records per person)."""
    sizes, weights = _RECORDS_PER_PERSON
    mean = sum(s * w for s, w in zip(sizes, weights)) / sum(weights)
    return generate(max(1, round(n_records / mean)), seed)
