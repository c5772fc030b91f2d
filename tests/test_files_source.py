"""The files source: sales staff's CSV/XLSX lists in a landing folder, each content read once."""
from __future__ import annotations

import csv
import io
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import openpyxl
import pytest

from crm_sync.config import SourceConfig
from crm_sync.simulators import spreadsheet
from crm_sync.simulators.people import generate_people
from crm_sync.sources import base
from crm_sync.sources.files_source import FilesExtractor, sha256_file
from crm_sync.sources.sheets import FileRejected, decode_text, header_norm, integral_text, read_file, record_key
from crm_sync.watermark import Window

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
WINDOW = Window(since=None, until=NOW)
PEOPLE = generate_people(240, 11)

def make_cfg(**files) -> SourceConfig:
    return SourceConfig.model_validate({
        "source": "sales_files", "kind": "files", "conn_id": "sales_landing", "schedule": "@hourly",
        "sync_mode": "incremental",
        "streams": [{
            "name": "customers", "entity": "customer", "primary_key": "_key", "cursor_field": "_modified_at",
            "files": {"columns": spreadsheet.COLUMNS, "key_fields": list(spreadsheet.KEY_FIELDS), **files},
            "identity": {"name": "contact", "phones": ["mobile"], "email": "email", "company": "company",
                         "city": "city"},
            "mapping": {
                "full_name": {"from": "contact"}, "company": {"from": "company"}, "city": {"from": "city"},
                "source_updated_at": {"from": "_modified_at", "type": "timestamptz", "required": True},
            },
            "expectation_suite": "customer",
        }],
    })


CFG = make_cfg()
STREAM = CFG.streams[0]


def write_csv(path: Path, rows: list[list[str]], encoding: str = "utf-8") -> Path:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)
    path.write_bytes(buffer.getvalue().encode(encoding))
    return path


def by_row(read) -> dict[int, dict]:
    return {r["_row"]: r for r in read.records}


@pytest.fixture()
def landing(tmp_path) -> Path:
    folder = tmp_path / "landing"
    folder.mkdir()
    return folder


@pytest.fixture()
def ledger(conn):
    """The CRM connection with an empty sync.file_ledger (finish() commits, so clean up by hand)."""
    with conn.cursor() as cur:
        cur.execute("delete from sync.file_ledger")
    conn.commit()
    yield conn
    conn.rollback()
    with conn.cursor() as cur:
        cur.execute("delete from sync.file_ledger")
    conn.commit()


def run_extract(conn, landing: Path, run_id: str) -> tuple[FilesExtractor, list[dict]]:
    """What the extract task does: read with the ledger bound, record the ledger, commit."""
    ex = FilesExtractor(CFG, STREAM, landing)
    with conn.cursor() as cur:
        ex.bind(cur)
        records = [r for batch in ex.records(WINDOW) for r in batch]
        ex.stage(cur, run_id)
    conn.commit()
    return ex, records


def ledger_rows(conn) -> dict[str, tuple]:
    with conn.cursor() as cur:
        cur.execute("select file_name, state, rows, run_id, reason, done_at is not null from sync.file_ledger")
        return {r[0]: r[1:] for r in cur.fetchall()}


# --- the simulator -------------------------------------------------------------------------------

def test_simulator_is_deterministic_and_as_messy_as_promised(tmp_path):
    one = spreadsheet.write_landing(tmp_path / "a", PEOPLE, seed=5, now=NOW)
    two = spreadsheet.write_landing(tmp_path / "b", PEOPLE, seed=5, now=NOW)
    assert one == two
    for f in one.files:
        assert (tmp_path / "a" / f.name).read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    other = spreadsheet.write_landing(tmp_path / "c", PEOPLE, seed=6, now=NOW)
    assert other != one

    assert sorted(f.encoding or f.format for f in one.files) == ["gb18030", "gbk", "utf-8", "utf-8-sig", "xlsx", "xlsx"]
    for name, column in spreadsheet.COLUMNS.items():
        assert {f.headers[name] for f in one.files} == set(column["headers"]), name
    assert one.rows == sum(len(f.truth) for f in one.files) >= len(PEOPLE)
    assert {p for f in one.files for p in f.truth.values()} == {p.person_id for p in PEOPLE}
    assert len(one.shared_people()) > 10
    assert all(f.blank_rows > 0 for f in one.files)

    gb18030 = next(f for f in one.files if f.encoding == "gb18030")
    with pytest.raises(UnicodeDecodeError):
        (tmp_path / "a" / gb18030.name).read_bytes().decode("gbk")
    books = [openpyxl.load_workbook(tmp_path / "a" / f.name) for f in one.files if f.format == "xlsx"]
    for book in books:
        ranges = [str(r) for r in book.active.merged_cells.ranges]
        assert any(r.startswith("A1:") for r in ranges)            # the title row
        assert any(r[1:].startswith("2:") for r in ranges)          # the merged header cell
    assert any(len(book.active.merged_cells.ranges) > 2 for book in books)  # owner merged down


def test_bad_files(tmp_path):
    names = spreadsheet.write_bad_files(tmp_path)
    assert len(names) == 2 and all((tmp_path / n).exists() for n in names)


# --- reading -------------------------------------------------------------------------------------

def test_every_simulated_file_reads_exactly_as_the_manifest_says(tmp_path):
    manifest = spreadsheet.write_landing(tmp_path, PEOPLE, seed=5, now=NOW)
    for f in manifest.files:
        read = read_file(tmp_path / f.name, STREAM)
        assert read.encoding == {"gbk": "gb18030"}.get(f.encoding, f.encoding), f.name
        assert read.header_row == f.header_row
        assert read.blank_rows == f.blank_rows
        assert read.rejects == []
        rows = by_row(read)
        assert sorted(rows) == sorted(f.expected), f.name
        for row, want in f.expected.items():
            got = rows[row]
            assert {k: got.get(k) for k in want} == want, (f.name, row)
            assert got["_file"] == f.name
            assert got["_sheet"] == ("客户台账" if f.format == "xlsx" else None)
            assert got["_modified_at"] == datetime.fromtimestamp(
                (tmp_path / f.name).stat().st_mtime, tz=timezone.utc).isoformat()
            assert got["_key"] == record_key([want[k] for k in spreadsheet.KEY_FIELDS])


def test_the_same_customer_in_two_files_is_one_source_record(tmp_path):
    manifest = spreadsheet.write_landing(tmp_path, PEOPLE, seed=5, now=NOW)
    keys: dict[str, set[str]] = {}
    for f in manifest.files:
        for record in read_file(tmp_path / f.name, STREAM).records:
            keys.setdefault(record["_key"], set()).add(f.truth[record["_row"]])
    assert all(len(people) == 1 for people in keys.values())    # a key never joins two people
    assert sum(1 for f in manifest.files for _ in f.truth) - len(keys) > 5   # shared spellings collapsed


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "gbk", "gb18030"])
def test_each_encoding_reads_the_same_records(landing, encoding):
    rows = [["客户名称", "联系人", "手机", "城市"],
            ["上海华信科技有限公司", "王伟", "13800138000", "上海"],
            ["北京东方贸易有限公司", "李娜", "13900139000", "北京"]]
    if encoding == "gb18030":
        rows.append(["𠮷野家餐饮管理有限公司", "王䶮", "13700137000", "成都"])
    path = write_csv(landing / f"list_{encoding}.csv", rows, encoding)
    text, used = decode_text(path.read_bytes())
    assert used == {"gbk": "gb18030"}.get(encoding, encoding)   # short GBK text alone is often guessed as cp949
    read = read_file(path, STREAM)
    assert [(r["company"], r["contact"], r["mobile"], r["city"]) for r in read.records] == [tuple(r) for r in rows[1:]]
    assert read.records[0]["company"] == "上海华信科技有限公司"       # the BOM is not part of the first header


@pytest.mark.parametrize("field,variant", [(f, h) for f, c in spreadsheet.COLUMNS.items() for h in c["headers"]])
def test_each_header_variant_maps_to_its_field(landing, field, variant):
    headers = {f: c["headers"][0] for f, c in spreadsheet.COLUMNS.items()}
    headers[field] = variant
    values = {"company": "杭州远景软件有限公司", "contact": "陈静", "mobile": "13600136000", "email": "chen@x.cn",
              "city": "杭州", "owner": "张敏"}
    fields = list(headers)
    path = write_csv(landing / "v.csv", [[headers[f] for f in fields], [values[f] for f in fields]])
    record = read_file(path, STREAM).records[0]
    assert {f: record[f] for f in fields} == values


def test_headers_match_after_nfkc_casefold_and_whitespace(landing):
    path = write_csv(landing / "odd.csv", [[" ＣＵＳＴＯＭＥＲ　name ", "CONTACT", "mobile\u3000", "E-mail"],
                                          ["Acme", "Li Na", "13500135000", "li@acme.cn"]])
    record = read_file(path, STREAM).records[0]
    assert (record["company"], record["contact"], record["mobile"]) == ("Acme", "Li Na", "13500135000")
    assert record["email"] is None and record["E-mail"] == "li@acme.cn"    # not a known spelling: kept as is
    assert header_norm(" ＣＵＳＴＯＭＥＲ　name ") == header_norm("Customer Name")


def test_title_rows_blank_rows_extra_columns_and_row_numbers(landing):
    path = write_csv(landing / "t.csv", [
        ["2026年客户名单", "", "", "", ""],
        [],
        ["序号", "客户名称", "联系人", "手机", "", "备注"],
        ["1", "上海华信科技有限公司", "王伟", "13800138000", "", "老客户"],
        [],
        ["", "", "", "", "", ""],
        ["2", "北京东方贸易有限公司", "李娜", "", "x", ""],
        ["3", "", "", "", "", "合计 2 家"],
        ["4", "", "", " 13900139000 ", "", ""],
    ])
    read = read_file(path, STREAM)
    assert read.header_row == 3 and read.blank_rows == 2
    rows = by_row(read)
    assert sorted(rows) == [4, 7, 9]
    assert rows[4]["序号"] == "1" and rows[4]["备注"] == "老客户" and rows[4]["email"] is None
    assert rows[7]["mobile"] is None and rows[7]["column E"] == "x"      # a headerless column with data
    assert "column E" in rows[4] and rows[4]["column E"] is None
    assert rows[9]["mobile"] == " 13900139000 " and rows[9]["company"] is None  # values are not rewritten
    [reject] = read.rejects
    assert (reject.stream, reject.source_pk, reject.stage, reject.field) == (
        "customers", "t.csv:8", "extract", "company")
    assert "t.csv row 8" in reject.reason and "客户名称, 联系人, 手机" in reject.reason
    assert reject.payload["备注"] == "合计 2 家"


def test_key_is_normalised_and_stable(landing):
    a = write_csv(landing / "a.csv", [["客户名称", "联系人", "手机"], ["ＡＢＣ 公司 ", "Wang Wei", "13800138000"]])
    b = write_csv(landing / "b.csv", [["公司名称", "姓名", "手机号", "城市"], ["abc 公司", " wang wei", "13800138000.0", "上海"]])
    key_a = read_file(a, STREAM).records[0]["_key"]
    key_b = read_file(b, STREAM).records[0]["_key"]
    assert key_a == key_b and len(key_a) == 20


def test_integral_numbers_come_out_as_digits():
    assert integral_text("13800138000.0") == "13800138000"
    assert integral_text("1.38001380000E+10") == "13800138000"
    assert integral_text("1.3800138E+10") == "1.3800138E+10"      # Excel lost digits: left for the validator
    assert integral_text("1.38E+10") == "1.38E+10"
    assert integral_text("12.50") == "12.50"
    assert integral_text("5E+3") == "5E+3"                        # too few written digits to be sure
    assert integral_text("1.5E+1") == "15"
    assert integral_text("+86 138 0013 8000") == "+86 138 0013 8000"
    assert integral_text("１３８００１３８０００") == "１３８００１３８０００"
    assert integral_text("2026") == "2026"


def test_xlsx_title_row_merged_headers_and_numbers(landing):
    book = openpyxl.Workbook()
    ws = book.active
    ws.title = "华东"
    ws.append(["2026年华东区客户台账", None, None, None, None])
    ws.merge_cells("A1:E1")
    ws.append(["客户名称", "联系电话", None, "负责人", "备注"])
    ws.merge_cells("B2:C2")                                          # one header over two columns
    ws.append(["上海华信科技有限公司", 13800138000, None, "张敏", None])
    ws.append(["北京东方贸易有限公司", None, 13900139000.0, None, "右半边"])
    ws.append([None, None, None, None, None])
    ws.append(["广州宏图物流有限公司", "1.37001370000E+10", None, None, None])
    ws.append(["深圳星河电子有限公司", "13600136000.0", "0755-87654321", "李强", None])
    ws.append(["成都鼎泰建材有限公司", "1.38E+10", None, None, 0.25])
    ws.merge_cells("D3:D4")                                          # the owner merged down over two customers
    ws.merge_cells("D7:D8")
    path = landing / "华东.xlsx"
    book.save(path)
    read = read_file(path, STREAM)
    assert read.header_row == 2 and read.blank_rows == 1 and read.sheet == "华东"
    rows = by_row(read)
    assert sorted(rows) == [3, 4, 6, 7, 8]
    assert [rows[r]["mobile"] for r in (3, 4, 6, 7, 8)] == [
        "13800138000", "13900139000", "13700137000", "13600136000", "1.38E+10"]
    assert [rows[r]["owner"] for r in (3, 4, 6, 7, 8)] == ["张敏", "张敏", None, "李强", "李强"]
    assert rows[7]["联系电话 (C)"] == "0755-87654321"                  # a second value under one header is kept
    assert rows[8]["备注"] == "0.25" and rows[4]["备注"] == "右半边"
    assert all(r["_sheet"] == "华东" for r in rows.values())


def test_xlsx_sheet_by_name_and_missing_sheet(landing):
    book = openpyxl.Workbook()
    book.active.title = "说明"
    book.active.append(["请勿修改"])
    data = book.create_sheet("客户")
    data.append(["Customer Name", "Contact"])
    data.append(["Acme", "Li"])
    path = landing / "two.xlsx"
    book.save(path)
    stream = make_cfg(sheet="客户").streams[0]
    assert read_file(path, stream).records[0]["company"] == "Acme"
    with pytest.raises(FileRejected) as err:
        read_file(path, make_cfg(sheet="Sheet9").streams[0])
    assert err.value.field == "sheet" and "说明" in err.value.reason


def test_unreadable_files_are_rejected_naming_rows_and_columns(landing):
    names = spreadsheet.write_bad_files(landing)
    with pytest.raises(FileRejected) as err:
        read_file(landing / names[0], STREAM)
    assert err.value.field == "encoding"
    with pytest.raises(FileRejected) as err:
        read_file(landing / names[1], STREAM)
    assert err.value.field == "company"
    assert err.value.reason == "row 1-3: no header matches 客户名称 / 公司名称 / 客户全称 / Customer Name"

    broken = landing / "broken.xlsx"
    broken.write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    with pytest.raises(FileRejected) as err:
        read_file(broken, STREAM)
    assert err.value.field == "encoding" and "xlsx" in err.value.reason

    nul = landing / "nul.csv"
    nul.write_bytes("客户名称,联系人\n甲,乙\n\x00\x01\x02\n".encode("utf-8"))
    with pytest.raises(FileRejected) as err:
        read_file(nul, STREAM)
    assert err.value.field == "encoding" and err.value.reason.startswith("row 3:")

    strict = make_cfg(columns={**spreadsheet.COLUMNS, "contact": {"headers": ["联系人", "姓名"], "required": True}})
    path = write_csv(landing / "no_contact.csv", [["客户名称", "手机"], ["甲公司", "13800138000"]])
    with pytest.raises(FileRejected) as err:
        read_file(path, strict.streams[0])
    assert err.value.field == "contact"
    assert err.value.reason.startswith("row 1: no column for contact (expected a header 联系人 / 姓名)")


# --- the ledger: once per content, moves after commit --------------------------------------------

def test_landing_run_stages_rejects_and_finishes(ledger, landing):
    manifest = spreadsheet.write_landing(landing, PEOPLE, seed=5, now=NOW)
    bad = spreadsheet.write_bad_files(landing)
    (landing / "~$01_王芳_客户名单.xlsx").write_bytes(b"lock")       # Excel's lock file: ignored
    (landing / "notes.txt").write_text("not a pattern")
    (landing / "sub").mkdir()
    write_csv(landing / "sub" / "nested.csv", [["客户名称"], ["甲"]])  # top level only

    ex, records = run_extract(ledger, landing, "run-1")
    assert len(records) == manifest.rows
    assert [f.name for f in ex.files] == sorted(f.name for f in manifest.files) + sorted(bad)
    file_rejects = [r for r in ex.rejects if r.source_pk in bad]
    assert {(r.source_pk, r.field, r.stage) for r in file_rejects} == {
        (bad[0], "encoding", "extract"), (bad[1], "company", "extract")}
    assert "91_会议签到表.csv: row 1-3: no header matches 客户名称" in file_rejects[1].reason
    rows = ledger_rows(ledger)
    assert {n: r[0] for n, r in rows.items()} == {**{f.name: "staged" for f in manifest.files},
                                                  **{n: "rejected" for n in bad}}
    assert all(rows[f.name][1] == f.rows for f in manifest.files)
    assert rows[bad[1]][3].endswith("no header matches 客户名称 / 公司名称 / 客户全称 / Customer Name")
    # nothing moves before the load committed
    assert all((landing / f.name).exists() for f in manifest.files) and (landing / bad[0]).exists()

    FilesExtractor.finish(ledger, CFG, "run-1", landing=landing)
    rows = ledger_rows(ledger)
    assert {rows[f.name][0] for f in manifest.files} == {"loaded"}
    assert all(r[4] for r in rows.values())                           # done_at set
    assert sorted(p.name for p in (landing / "archive").iterdir()) == sorted(f.name for f in manifest.files)
    rejected = landing / "rejected"
    assert sorted(p.name for p in rejected.iterdir()) == sorted([*bad, *(n + ".reason.txt" for n in bad)])
    reason = (rejected / (bad[1] + ".reason.txt")).read_text(encoding="utf-8")
    assert "file: 91_会议签到表.csv" in reason and "row 1-3: no header matches 客户名称" in reason and "run-1" in reason
    assert (landing / "~$01_王芳_客户名单.xlsx").exists() and (landing / "sub" / "nested.csv").exists()

    FilesExtractor.finish(ledger, CFG, "run-1", landing=landing)     # idempotent
    assert ledger_rows(ledger) == rows
    assert len(list((landing / "archive").iterdir())) == len(manifest.files)

    again, records = run_extract(ledger, landing, "run-2")
    assert records == [] and again.rejects == []


def test_same_content_under_a_new_name_is_not_read_again(ledger, landing, tmp_path):
    path = write_csv(landing / "客户.csv", [["客户名称", "联系人"], ["甲公司", "王伟"]])
    keep = tmp_path / "copy.csv"
    shutil.copy(path, keep)
    run_extract(ledger, landing, "run-1")
    FilesExtractor.finish(ledger, CFG, "run-1", landing=landing)

    shutil.copy(keep, landing / "客户(1).csv")                       # uploaded again under another name
    shutil.copy(keep, landing / "客户.csv")                          # and under the same name
    ex, records = run_extract(ledger, landing, "run-2")
    assert records == [] and ex.rejects == []
    assert [f.state for f in ex.files] == ["skipped (loaded before)", "skipped (loaded before)"]
    assert not any(landing.glob("*.csv"))
    checksum = sha256_file(keep)
    assert sorted(p.name for p in (landing / "archive").iterdir()) == sorted(
        ["客户.csv", "客户(1).csv", f"客户.{checksum[:12]}.csv"])   # an archived name is never overwritten
    assert ledger_rows(ledger)["客户.csv"][2] == "run-1"


def test_two_files_with_the_same_bytes_in_one_run_are_read_once(ledger, landing):
    write_csv(landing / "a.csv", [["客户名称"], ["甲公司"]])
    shutil.copy(landing / "a.csv", landing / "b.csv")
    ex, records = run_extract(ledger, landing, "run-1")
    assert [(f.name, f.state) for f in ex.files] == [("a.csv", "staged"), ("b.csv", "duplicate")]
    assert len(records) == 1
    FilesExtractor.finish(ledger, CFG, "run-1", landing=landing)
    assert (landing / "b.csv").exists()                               # the next run archives it unread
    ex, records = run_extract(ledger, landing, "run-2")
    assert records == [] and not (landing / "b.csv").exists()


def test_a_run_whose_load_failed_is_read_again_and_interrupted_moves_are_repaired(ledger, landing):
    write_csv(landing / "a.csv", [["客户名称"], ["甲公司"]])
    write_csv(landing / "b.csv", [["客户名称"], ["乙公司"]])
    write_csv(landing / "c.csv", [["序号"], ["1"]])
    run_extract(ledger, landing, "run-1")                             # ...and the load fails: no finish
    ex, records = run_extract(ledger, landing, "run-2")
    assert [r["company"] for r in records] == ["甲公司", "乙公司"]   # staged, not loaded: read again
    assert [f.state for f in ex.files] == ["staged", "staged", "skipped (rejected before)"]
    assert ex.rejects == []                                           # quarantined by run-1 already
    assert (landing / "rejected" / "c.csv.reason.txt").exists()       # a settled rejection moves at once
    rows = ledger_rows(ledger)
    assert rows["a.csv"][:3] == ("staged", 1, "run-2") and rows["c.csv"][2] == "run-1"

    # the ledger says loaded but the move never happened (a crash right after the commit)
    with ledger.cursor() as cur:
        cur.execute("update sync.file_ledger set state = 'loaded' where file_name = 'a.csv'")
    ledger.commit()
    ex, records = run_extract(ledger, landing, "run-3")
    assert [r["company"] for r in records] == ["乙公司"]
    assert (landing / "archive" / "a.csv").exists()


def test_finish_leaves_a_replaced_file_for_the_next_run(ledger, landing):
    path = write_csv(landing / "a.csv", [["客户名称"], ["甲公司"]])
    run_extract(ledger, landing, "run-1")
    write_csv(path, [["客户名称"], ["甲公司"], ["乙公司"]])           # a new version uploaded meanwhile
    FilesExtractor.finish(ledger, CFG, "run-1", landing=landing)
    assert path.exists() and not (landing / "archive").exists()
    ex, records = run_extract(ledger, landing, "run-2")
    assert [r["company"] for r in records] == ["甲公司", "乙公司"]


def test_records_need_the_ledger(landing):
    write_csv(landing / "a.csv", [["客户名称"], ["甲公司"]])
    with pytest.raises(RuntimeError, match="bind"):
        list(FilesExtractor(CFG, STREAM, landing).records(WINDOW))


def test_patterns_are_case_insensitive(ledger, landing):
    write_csv(landing / "A.CSV", [["客户名称"], ["甲公司"]])
    write_csv(landing / "b.tsv", [["客户名称"], ["乙公司"]])
    assert [r["company"] for r in run_extract(ledger, landing, "run-1")[1]] == ["甲公司"]


def test_records_stage_into_the_pipeline(ledger, landing):
    from crm_sync.sources import extract

    manifest = spreadsheet.write_landing(landing, PEOPLE, seed=5, now=NOW)
    ex = FilesExtractor(CFG, STREAM, landing)
    with ledger.cursor() as cur:
        ex.bind(cur)
        result = extract.stage_records(ledger, "run-s", CFG, STREAM, WINDOW, ex.records(WINDOW))
        ex.stage(cur, "run-s")
        cur.execute("select count(*), count(distinct source_pk) from stg.extracted where run_id = 'run-s'")
        staged, distinct = cur.fetchone()
    keys = {r["_key"] for f in manifest.files for r in read_file(landing / f.name, STREAM).records}
    assert result.rows == staged == distinct == len(keys) < manifest.rows
    ledger.rollback()


# --- the Airflow side ----------------------------------------------------------------------------

def test_open_finds_the_landing_folder_through_the_airflow_connection(monkeypatch, landing):
    monkeypatch.setenv("AIRFLOW_CONN_SALES_LANDING", json.dumps({"conn_type": "fs", "extra": {"path": str(landing)}}))
    ex = base.extractor_for(CFG, STREAM)
    assert isinstance(ex, FilesExtractor) and ex.landing == landing
    assert base.extractor_class("files") is FilesExtractor

    monkeypatch.setenv("AIRFLOW_CONN_SALES_LANDING", json.dumps({"conn_type": "fs", "host": str(landing)}))
    assert FilesExtractor.open(CFG, STREAM).landing == landing

    gone = json.dumps({"conn_type": "fs", "extra": {"path": str(landing / "x")}})
    monkeypatch.setenv("AIRFLOW_CONN_SALES_LANDING", gone)
    with pytest.raises(FileNotFoundError, match="sales_landing"):
        FilesExtractor.open(CFG, STREAM)
