"""The call-center CDR simulator behaves like the feed the pipeline's YAML is written against."""
from __future__ import annotations

import pickle
import re
import secrets
import unicodedata
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
import requests

from crm_sync.simulators.callcenter import HOTLINES, CallCenterServer, CallCenterStore
from crm_sync.simulators.people import generate_people

NOW = datetime(2025, 3, 1, 4, 0, tzinfo=timezone.utc)
PEOPLE = generate_people(400, 21)
PATH = "/api/v1/cdr"


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _key(call: dict) -> tuple[datetime, str]:
    return _ts(call["created_at"]), call["call_id"]


def _customer_side(call: dict) -> str:
    return call["caller"] if call["direction"] == "inbound" else call["callee"]


@pytest.fixture(scope="module")
def store():
    return CallCenterStore.generate(PEOPLE, seed=21, now=NOW)


@pytest.fixture(scope="module")
def center(store):
    login, password = "cc-sync", secrets.token_urlsafe(12)
    with CallCenterServer(store, login, password) as server:
        server.auth = (login, password)
        yield server


@pytest.fixture()
def api(center):
    center.reset()
    yield center
    center.reset()


def _get(server, auth="default", **params):
    auth = server.auth if auth == "default" else auth
    return requests.get(server.base_url + PATH, params=params, auth=auth, timeout=5)


def _follow_links(server, url: str) -> list[requests.Response]:
    responses = []
    while url:
        response = requests.get(url, auth=server.auth, timeout=5)
        assert response.status_code == 200, response.text
        responses.append(response)
        url = response.links.get("next", {}).get("url")
    return responses


# --- store --------------------------------------------------------------------------------------

def test_store_is_deterministic_per_seed_and_survives_pickling(store):
    again = CallCenterStore.generate(PEOPLE, seed=21, now=NOW)
    assert (store.calls, store.truth, store.numbers, store.unknown_numbers) == \
           (again.calls, again.truth, again.numbers, again.unknown_numbers)
    assert CallCenterStore.generate(PEOPLE, seed=22, now=NOW).calls != store.calls
    revived = pickle.loads(pickle.dumps(store))  # the demo keeps the call center between runs this way
    assert revived.calls == store.calls and revived.truth == store.truth

    assert list(store.truth) == [c["call_id"] for c in store.calls]
    assert all(re.fullmatch(r"c\d+", cid) for cid in store.truth)
    callers = Counter(pid for pid in store.truth.values() if pid)
    assert 0.2 * len(PEOPLE) < len(callers) < 0.4 * len(PEOPLE)
    assert max(callers.values()) <= 5
    orphans = [cid for cid, pid in store.truth.items() if pid is None]
    assert 0.02 * len(store.calls) < len(orphans) < 0.10 * len(store.calls)
    assert {store.numbers[cid] for cid in orphans} == store.unknown_numbers
    known = {p.mobile for p in PEOPLE} | {p.landline for p in PEOPLE if p.landline}
    assert not store.unknown_numbers & known, "an orphan number must belong to nobody"


def test_calls_appear_only_after_they_ended(store):
    for call in store.calls:
        start, created = _ts(call["start_time"]), _ts(call["created_at"])
        ended = start + timedelta(seconds=call["duration"])
        assert ended + timedelta(minutes=1) <= created <= ended + timedelta(minutes=15)
        assert created < NOW and NOW - start < timedelta(days=31)
        assert call["created_at"].endswith("+08:00") and call["start_time"].endswith("+08:00")
        if call["duration"] == 0:
            assert call["recording_url"] is None and call["disposition"] == []
        if call["recording_url"]:
            assert call["recording_url"].startswith("https://rec.example.invalid/")
    assert [_key(c) for c in store.calls] == sorted(_key(c) for c in store.calls)
    assert {c["direction"] for c in store.calls} == {"inbound", "outbound"}
    assert any(c["duration"] == 0 for c in store.calls) and any(c["agent_id"] is None for c in store.calls)
    assert {c["queue"] for c in store.calls} == {"售前", "售后", "VIP", None}


CUSTOMER_FORMS = {
    "plain": r"1\d{10}",
    "intl_spaced": r"\+86 1\d{2} \d{4} \d{4}",
    "intl_00": r"0086-1\d{10}",
    "dashed": r"1\d{2}-\d{4}-\d{4}",
    "fullwidth": r"[０-９][０-９ ]+",
    "zhuan": r"0\d{2,3}-\d{8}转\d+",
    "paren_ext": r"\(0\d{2,3}\)\d{8}-\d+",
    "intl_ext": r"\+86 \d{2,3} \d{4} \d{4} ext \d+",
}


def test_customer_numbers_come_in_every_form_and_spell_the_true_number(store):
    forms = Counter()
    by_id = {p.person_id: p for p in PEOPLE}
    for call in store.calls:
        hotline, customer = (call["callee"], call["caller"]) if call["direction"] == "inbound" \
            else (call["caller"], call["callee"])
        assert hotline in HOTLINES
        forms.update(name for name, pattern in CUSTOMER_FORMS.items() if re.fullmatch(pattern, customer))
        digits = re.sub(r"\D", "", unicodedata.normalize("NFKC", customer))
        true_number = store.numbers[call["call_id"]]
        area, _, rest = true_number.partition("-")
        local, _, extension = rest.partition("转")
        if not rest:  # a mobile: whatever the country prefix, the number ends the string
            assert digits.endswith(true_number) and len(digits) in (11, 13, 15)
        else:
            # a PBX may drop the extension and show only the switchboard
            assert area.lstrip("0") + local in digits
            assert digits.endswith(extension) or customer == f"{area}-{local}"
        person_id = store.truth[call["call_id"]]
        if person_id:
            person = by_id[person_id]
            assert true_number in (person.mobile, f"{person.landline}转{person.extension}", person.landline)
    assert set(forms) == set(CUSTOMER_FORMS), f"forms seen: {forms}"


def test_apply_changes_adds_late_arriving_calls_in_the_window():
    changing = CallCenterStore.generate(PEOPLE, seed=21, now=NOW)
    twin = pickle.loads(pickle.dumps(changing))
    old_callers = set(changing.truth.values()) - {None}
    later = NOW + timedelta(hours=2)
    changed = changing.apply_changes(seed=21, now=later, n_new=40)
    assert changed == twin.apply_changes(seed=21, now=later, n_new=40) and changing.calls == twin.calls

    window_start = later - timedelta(hours=1)
    new = [c for c in changing.calls if c["call_id"] in set(changed["new_calls"])]
    assert len(new) == 40 and all(window_start <= _ts(c["created_at"]) < later for c in new)
    late = {c["call_id"] for c in new if _ts(c["start_time"]) < window_start}
    assert late and late == set(changed["late_arrivals"])
    assert changed["new_callers"], "first-time callers keep coming"
    assert not set(changed["new_callers"]) & old_callers
    assert [_key(c) for c in changing.calls] == sorted(_key(c) for c in changing.calls)


# --- API ----------------------------------------------------------------------------------------

def test_basic_auth_is_required(api):
    for auth in (None, (api.auth[0], "wrong"), ("someone", api.auth[1])):
        response = _get(api, auth=auth)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == 'Basic realm="cdr"'
        assert response.json() == {"error": "unauthorized"}
    garbage = requests.get(api.base_url + PATH, headers={"Authorization": "Basic !!!"}, timeout=5)
    bearer = requests.get(api.base_url + PATH, headers={"Authorization": f"Bearer {api.auth[1]}"}, timeout=5)
    assert garbage.status_code == bearer.status_code == 401
    assert requests.get(api.base_url + "/_admin/stats", timeout=5).status_code == 401
    assert _get(api).status_code == 200


def test_following_links_returns_every_record_in_the_window_once(api):
    created_from, created_to = NOW - timedelta(days=20), NOW - timedelta(days=3)
    # the offsets go unencoded, so the '+' arrives as a space, as it does from careless clients
    url = (f"{api.base_url}{PATH}?created_from={created_from.astimezone(timezone(timedelta(hours=8))).isoformat()}"
           f"&created_to={created_to.isoformat()}&limit=17")
    responses = _follow_links(api, url)
    expected = [c for c in api.store.calls if created_from <= _ts(c["created_at"]) < created_to]
    got = [record for response in responses for record in response.json()]
    assert got == sorted(expected, key=_key) and len(got) > 3 * 17
    assert all(int(r.headers["X-Total-Count"]) == len(expected) for r in responses)
    assert all(len(r.json()) == 17 and r.links["next"]["url"].startswith(api.base_url) for r in responses[:-1])
    assert "Link" not in responses[-1].headers and 1 <= len(responses[-1].json()) <= 17


def test_offset_paging_gives_the_same_records(api):
    total = int(_get(api, limit=1).headers["X-Total-Count"])
    assert total == len(api.store.calls)
    seen = []
    for offset in range(0, total, 250):
        response = _get(api, offset=offset, limit=250)
        assert response.status_code == 200
        seen += response.json()
    assert seen == api.store.calls
    past_the_end = _get(api, offset=total, limit=10)
    assert past_the_end.json() == [] and "Link" not in past_the_end.headers


def test_window_is_from_inclusive_to_exclusive(api):
    ordered = api.store.calls
    created_from, created_to = ordered[10]["created_at"], ordered[60]["created_at"]
    response = _get(api, created_from=created_from, created_to=created_to, limit=1000)
    got = [r["call_id"] for r in response.json()]
    expected = [c["call_id"] for c in ordered if _ts(created_from) <= _ts(c["created_at"]) < _ts(created_to)]
    assert got == expected and ordered[10]["call_id"] in got and ordered[60]["call_id"] not in got
    assert int(response.headers["X-Total-Count"]) == len(expected)


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 1001}, {"limit": "ten"}, {"offset": -1},
                                    {"created_from": "yesterday"}, {"created_to": "2025-03-01T00:00:00"}])
def test_bad_parameters_answer_400(api, params):
    response = _get(api, **params)
    assert response.status_code == 400 and response.json()["error"]


def test_rate_limit_answers_429_with_retry_after_and_outage_503(api):
    api.set_faults(rate_limit_every=2, retry_after_seconds=3)
    statuses = [_get(api, limit=5) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 429, 200]
    assert statuses[1].headers["Retry-After"] == "3" and "rate limit" in statuses[1].json()["error"]

    api.reset()
    answer = requests.post(api.base_url + "/_admin/faults", json={"outage": True}, auth=api.auth, timeout=5)
    assert answer.status_code == 200 and answer.json()["outage"] is True
    assert _get(api).status_code == 503
    stats = requests.get(api.base_url + "/_admin/stats", auth=api.auth, timeout=5).json()
    assert stats == {"calls": 1, "by_endpoint": {PATH: {"503": 1}}}
