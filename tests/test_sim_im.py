"""The enterprise IM simulator honours the API contract the pipeline's IM source YAML is written against."""
from __future__ import annotations

import math
import pickle
import re
import secrets
from datetime import datetime, timedelta, timezone

import pytest
import requests

from crm_sync.simulators.im import ImServer, ImStore
from crm_sync.simulators.people import generate_people

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
PEOPLE = generate_people(300, 13)
CONTACTS, SESSIONS = "/open/v1/contacts", "/open/v1/sessions"


@pytest.fixture(scope="module")
def chat():
    key = secrets.token_urlsafe(16)
    with ImServer(ImStore.generate(PEOPLE, seed=13, now=NOW), key) as server:
        yield server


@pytest.fixture()
def api(chat):
    chat.reset()
    yield chat
    chat.reset()


def _get(server, path, key="default", **params):
    key = server.api_key if key == "default" else key
    headers = {"X-Api-Key": key} if key else {}
    return requests.get(server.base_url + path, params=params, headers=headers, timeout=5)


def _all_pages(server, path, **params) -> list[list[dict]]:
    pages, page = [], 1
    while True:
        response = _get(server, path, page=page, **params)
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["errcode"], body["errmsg"]) == (0, "ok")
        pages.append(body["result"]["items"])
        if page >= body["result"]["total_pages"]:
            return pages
        page += 1


def _ts(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    assert value.tzinfo is not None, text
    return value


def _key(record: dict, id_field: str) -> tuple[datetime, str]:
    return _ts(record["updated_at"]), record[id_field]


def test_store_is_deterministic_and_shaped_like_the_contract():
    store = ImStore.generate(PEOPLE, seed=13, now=NOW)
    again = ImStore.generate(PEOPLE, seed=13, now=NOW)
    assert (store.contacts, store.sessions, store.truth, store.orphan_sessions) == \
           (again.contacts, again.sessions, again.truth, again.orphan_sessions)
    assert ImStore.generate(PEOPLE, seed=14, now=NOW).contacts != store.contacts
    revived = pickle.loads(pickle.dumps(store))  # the demo keeps stores between runs this way
    assert revived.contacts == store.contacts and revived.orphan_sessions == store.orphan_sessions

    served = {c["external_userid"] for c in store.contacts}
    assert set(store.truth) == served and all(re.fullmatch(r"wm[0-9a-f]{16}", u) for u in served)
    people = list(store.truth.values())
    assert 0.3 * len(PEOPLE) < len(set(people)) < 0.5 * len(PEOPLE)
    assert len(people) > len(set(people))  # someone added by two reps
    assert {c["gender"] for c in store.contacts} == {0, 1, 2}

    orphans = set(store.orphan_sessions)
    assert 0.01 * len(store.sessions) < len(orphans) < 0.06 * len(store.sessions)
    assert set(store.orphan_sessions.values()) == set(store.pending_contacts)
    assert not set(store.pending_contacts) & served
    assert {s["session_id"] for s in store.sessions if s["external_userid"] not in served} == orphans

    closed = [s for s in store.sessions if s["status"] == "closed"]
    assert 0.7 < len(closed) / len(store.sessions) < 0.9
    assert all(_ts(s["started_at"]) <= _ts(s["ended_at"]) <= _ts(s["updated_at"]) for s in closed)
    assert all(s["ended_at"] is None for s in store.sessions if s["status"] == "open")
    stamps = [r["updated_at"] for r in store.contacts + store.sessions]
    assert any(s.endswith("+08:00") for s in stamps) and any(s.endswith("Z") for s in stamps)
    assert all(_ts(s) < NOW for s in stamps)


def test_requests_without_the_api_key_get_401(api):
    for key in (None, "not-the-key"):
        response = _get(api, CONTACTS, key=key)
        assert response.status_code == 401
        assert response.json() == {"errcode": 40001, "errmsg": "invalid api key"}
    assert _get(api, SESSIONS).status_code == 200
    assert requests.get(api.base_url + "/_admin/stats", timeout=5).status_code == 401
    assert requests.post(api.base_url + "/_admin/faults", json={"outage": True}, timeout=5).status_code == 401


def test_page_numbers_return_every_record_of_a_window_once(api):
    for path, records, id_field in ((CONTACTS, api.store.contacts, "external_userid"),
                                    (SESSIONS, api.store.sessions, "session_id")):
        ordered = sorted(records, key=lambda r: _key(r, id_field))
        since, until = _ts(ordered[5]["updated_at"]), _ts(ordered[-5]["updated_at"])
        pages = _all_pages(api, path, page_size=7, modified_from=since.isoformat(), modified_to=until.isoformat())
        expected = [r[id_field] for r in ordered if since <= _ts(r["updated_at"]) < until]
        assert len(pages) == math.ceil(len(expected) / 7) and all(len(p) == 7 for p in pages[:-1])
        assert [r[id_field] for page in pages for r in page] == expected  # once each, in (updated_at, id) order
        body = _get(api, path, page_size=7, modified_from=since.isoformat(), modified_to=until.isoformat()).json()
        assert (body["result"]["total"], body["result"]["page"], body["result"]["page_size"]) == (len(expected), 1, 7)


def test_modified_from_is_inclusive_and_modified_to_exclusive(api):
    ordered = sorted(api.store.contacts, key=lambda r: _key(r, "external_userid"))
    first, last = ordered[10], ordered[30]
    # sent with its offset's '+' unencoded, as a hand-built query string does: it arrives as a space
    since = _ts(first["updated_at"]).astimezone(timezone(timedelta(hours=8))).isoformat()
    url = f"{api.base_url}{CONTACTS}?page_size=500&modified_from={since}&modified_to={last['updated_at']}"
    assert "+08:00" in url
    response = requests.get(url, headers={"X-Api-Key": api.api_key}, timeout=5)
    got = [r["external_userid"] for r in response.json()["result"]["items"]]
    assert got[0] == first["external_userid"] and last["external_userid"] not in got
    assert set(got) == {r["external_userid"] for r in ordered
                        if _ts(first["updated_at"]) <= _ts(r["updated_at"]) < _ts(last["updated_at"])}
    assert _get(api, CONTACTS, modified_from="yesterday").status_code == 400


def test_status_filter_returns_only_sessions_of_that_status(api):
    closed = [r for page in _all_pages(api, SESSIONS, page_size=100, status="closed") for r in page]
    opened = [r for page in _all_pages(api, SESSIONS, page_size=100, status="open") for r in page]
    assert closed and all(s["status"] == "closed" and s["ended_at"] for s in closed)
    assert opened and all(s["status"] == "open" and s["ended_at"] is None for s in opened)
    assert len(closed) + len(opened) == len(api.store.sessions)
    assert _get(api, SESSIONS, status="pending").status_code == 400


def test_paging_edges(api):
    body = _get(api, CONTACTS, page_size=50).json()["result"]
    past = _get(api, CONTACTS, page_size=50, page=body["total_pages"] + 1)
    assert past.status_code == 200 and past.json()["result"]["items"] == []
    assert past.json()["result"]["total"] == body["total"] == len(api.store.contacts)
    assert len(_get(api, CONTACTS).json()["result"]["items"]) == 50  # default page_size
    for bad in ({"page_size": 0}, {"page_size": 501}, {"page": 0}, {"page": "two"}):
        response = _get(api, CONTACTS, **bad)
        assert response.status_code == 400 and response.json()["errcode"] != 0, bad
    assert _get(api, CONTACTS, page_size=500).status_code == 200


def test_rate_limit_answers_429_with_retry_after_and_is_counted(api):
    api.set_faults(rate_limit_every=2, retry_after_seconds=3)
    statuses = [_get(api, SESSIONS, page_size=5) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 429, 200]
    assert statuses[1].headers["Retry-After"] == "3" and statuses[1].json()["errcode"] != 0
    stats = requests.get(api.base_url + "/_admin/stats", headers={"X-Api-Key": api.api_key}, timeout=5).json()
    assert stats["by_endpoint"] == {SESSIONS: {"200": 2, "429": 1}}

    answer = requests.post(api.base_url + "/_admin/faults", json={"outage": True},
                           headers={"X-Api-Key": api.api_key}, timeout=5)
    assert answer.status_code == 200 and answer.json()["outage"] is True
    assert _get(api, CONTACTS).status_code == 503


def test_apply_changes_lands_in_the_window_and_brings_the_orphans_contacts():
    store = ImStore.generate(PEOPLE, seed=13, now=NOW)
    orphans = dict(store.orphan_sessions)
    later = NOW + timedelta(hours=6)
    start = later - timedelta(seconds=3_600)
    changed = store.apply_changes(seed=13, now=later, n_updates=8, n_new=4)
    assert changed == ImStore.generate(PEOPLE, seed=13, now=NOW).apply_changes(seed=13, now=later, n_updates=8, n_new=4)
    assert sorted(orphans) == changed["linked_sessions"] and not store.orphan_sessions and not store.pending_contacts

    with ImServer(store, "k") as server:
        window = {"modified_from": start.isoformat(), "modified_to": later.isoformat(), "page_size": 500}
        contacts = {c["external_userid"]: c for c in _get(server, CONTACTS, **window).json()["result"]["items"]}
        sessions = {s["session_id"]: s for s in _get(server, SESSIONS, **window).json()["result"]["items"]}
        assert set(contacts) == set(changed["updated_contacts"]) | set(changed["new_contacts"])
        assert set(orphans.values()) <= set(contacts)  # the held sessions' contacts arrive now
        assert len(set(changed["new_contacts"]) - set(orphans.values())) == 4
        assert set(sessions) == set(changed["closed_sessions"]) | set(changed["new_sessions"])
        assert not set(orphans) & set(sessions)  # the orphan sessions themselves did not change
        for session_id in changed["closed_sessions"]:
            s = sessions[session_id]
            assert s["status"] == "closed" and start <= _ts(s["ended_at"]) <= _ts(s["updated_at"]) < later
        everything = _get(server, CONTACTS, page_size=500).json()["result"]
        served = {c["external_userid"] for c in everything["items"]}
        assert everything["total"] == len(store.contacts) and set(orphans.values()) <= served
        assert set(store.truth) == served
