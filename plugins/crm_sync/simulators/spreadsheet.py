"""Sales staff's customer lists, as CSV and XLSX files dropped into a landing folder.

Guarantees:
- `write_landing(folder, people, seed=..., now=...)` writes the same bytes for the same people,
  seed and `now` (XLSX zip timestamps and document properties are pinned to `now`; every file's
  mtime is set to an hour before the next, ending an hour before `now`). Each file is one sales
  rep's list; with the default six files there are CSVs in UTF-8, UTF-8 with BOM, GBK and
  GB18030 and two XLSX workbooks, and every header spelling of every column appears somewhere.
- What the reader has to cope with, all on purpose: header spellings per file (客户名称 / 公司名称 /
  客户全称 / Customer Name, ...), columns in varying order and unknown columns (序号, 备注), blank
  rows between records, a title row (and an empty line) above the header of the GBK export;
  in the XLSX: a merged title row, the mobile header cell merged over two columns with the
  number typed into either half, phones stored as numbers (int or float) and a few as the
  text Excel produces when a CSV is pasted ('1.38001380000E+10'), and, in the second
  workbook, the owner cell merged down over runs of consecutive customers; a few mobiles in
  the UTF-8 CSV written as '13800138000.0' (a float export); characters outside GBK in the
  GB18030 file's notes; about 12% of the customers listed by a second rep too, half of them
  spelt exactly alike (same record key), half rendered anew.
- The `Manifest` says, per file, the encoding, the header row, the headers used, the number of
  non-blank rows and, per row number as Excel shows it, the true person_id and the values a
  correct reader returns. The pipeline never reads it.
- `write_bad_files(folder)` adds an undecodable `.csv` (random bytes) and a CSV whose header has
  none of the required columns.
"""
from __future__ import annotations

import csv
import io
import os
import random
import re
import zipfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Sequence

from crm_sync.simulators.people import Person, render_email, render_name, render_phone

FIELDS = ("company", "contact", "mobile", "email", "city", "owner")

# One header spelling per column per file; together the sets use every spelling the YAML knows.
HEADER_SETS: tuple[dict[str, str], ...] = (
    {"company": "客户名称", "contact": "联系人", "mobile": "手机", "email": "邮箱", "city": "城市", "owner": "负责人"},
    {"company": "公司名称", "contact": "姓名", "mobile": "手机号", "email": "电子邮件", "city": "所在城市", "owner": "销售"},
    {"company": "客户全称", "contact": "联系人", "mobile": "联系电话", "email": "邮箱", "city": "城市", "owner": "负责人"},
    {"company": "Customer Name", "contact": "Contact", "mobile": "Mobile", "email": "Email", "city": "City",
     "owner": "Owner"},
    {"company": "客户名称", "contact": "姓名", "mobile": "手机", "email": "电子邮件", "city": "所在城市", "owner": "销售"},
    {"company": "公司名称", "contact": "联系人", "mobile": "联系电话", "email": "Email", "city": "城市", "owner": "负责人"},
)
# (format, encoding) per file position; the two workbooks get the 公司名称 and 客户名称/姓名 headers
LAYOUTS: tuple[tuple[str, str | None], ...] = (
    ("csv", "utf-8"), ("xlsx", None), ("csv", "gbk"), ("csv", "utf-8-sig"), ("xlsx", None), ("csv", "gb18030"),
)
# the YAML the pipeline reads these files with (tests build their stream config from it)
COLUMNS = {
    "company": {"headers": ["客户名称", "公司名称", "客户全称", "Customer Name"], "required": True},
    "contact": {"headers": ["联系人", "姓名", "Contact"]},
    "mobile": {"headers": ["手机", "手机号", "联系电话", "Mobile"]},
    "email": {"headers": ["邮箱", "电子邮件", "Email"]},
    "city": {"headers": ["城市", "所在城市", "City"]},
    "owner": {"headers": ["负责人", "销售", "Owner"]},
}
KEY_FIELDS = ("company", "contact", "mobile")

_REPS = ("张敏", "李强", "王芳", "刘洋", "陈静", "杨帆", "赵磊", "黄丽", "周杰", "吴婷")
_NOTES = ("老客户", "年底续约", "需要报价", "已拜访", "重点跟进", "转介绍", "")
_BEYOND_GBK = ("𠮷野家门店对接", "法人：王䶮", "合同号 №€-2026")  # GB18030 only


@dataclass(frozen=True)
class LandingFile:
    name: str
    format: str                        # "csv" | "xlsx"
    encoding: str | None               # CSV text encoding; None for XLSX
    owner: str
    header_row: int                    # 1-based
    headers: dict[str, str]            # canonical field -> header text in this file
    rows: int                          # non-blank data rows
    blank_rows: int
    truth: dict[int, str]              # row number (as Excel shows it) -> person_id
    expected: dict[int, dict[str, str | None]]  # row number -> what a correct reader returns


@dataclass(frozen=True)
class Manifest:
    files: tuple[LandingFile, ...]

    def file(self, name: str) -> LandingFile:
        return next(f for f in self.files if f.name == name)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def shared_people(self) -> set[str]:
        """person_ids listed in more than one file."""
        seen: dict[str, set[str]] = {}
        for f in self.files:
            for person_id in f.truth.values():
                seen.setdefault(person_id, set()).add(f.name)
        return {p for p, names in seen.items() if len(names) > 1}


def _render(person: Person, rng: random.Random, owner: str) -> dict[str, str | None]:
    city = person.city + "市" if rng.random() < 0.2 else person.city
    return {"company": person.company, "contact": render_name(person, rng),
            "mobile": render_phone(person.mobile, rng), "email": render_email(person.email, rng),
            "city": city, "owner": owner}


def _encodable(values: dict[str, str | None], encoding: str | None) -> bool:
    if encoding is None:
        return True
    try:
        "".join(v for v in values.values() if v).encode(encoding)
    except UnicodeEncodeError:
        return False
    return True


def _reader_value(value: str | None) -> str | None:
    return None if value is None or value.strip() == "" else value


def _assign(people: Sequence[Person], files: int, rng: random.Random) -> list[list[tuple[Person, int | None]]]:
    """Split the people over the files; about 12% also go to a second file (with the index of
    the file they came from, so the second listing can copy the first one's spelling)."""
    order = list(people)
    rng.shuffle(order)
    chunks: list[list[tuple[Person, int | None]]] = [[] for _ in range(files)]
    for i, person in enumerate(order):
        chunks[i % files].append((person, None))
    for home in range(files):
        for person, _ in [entry for entry in chunks[home] if entry[1] is None]:
            if files > 1 and rng.random() < 0.12:
                other = rng.choice([f for f in range(files) if f != home])
                chunks[other].append((person, home))
    for chunk in chunks:
        rng.shuffle(chunk)
    return chunks


def _pin_xlsx(data: bytes, now: datetime) -> bytes:
    """The workbook's bytes with every timestamp set to `now`, so the same input gives the same checksum."""
    stamp = now.astimezone(timezone.utc).replace(tzinfo=None)
    w3c = stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            body = src.read(info.filename)
            if info.filename == "docProps/core.xml":
                body = re.sub(rb"(<dcterms:(?:created|modified)[^>]*>)[^<]*(</dcterms:)",
                              rb"\g<1>" + w3c.encode() + rb"\g<2>", body)
            pinned = zipfile.ZipInfo(info.filename, date_time=stamp.timetuple()[:6])
            pinned.compress_type = zipfile.ZIP_DEFLATED
            pinned.external_attr = info.external_attr
            dst.writestr(pinned, body)
    return out.getvalue()


def _sci_text(mobile: str) -> str:
    """How Excel writes an 11-digit number as text when a CSV is pasted: '1.38001380000E+10'."""
    return f"{mobile[0]}.{mobile[1:]}0E+10"


def write_landing(folder: Path, people: Sequence[Person], *, seed: int, now: datetime, files: int = 6) -> Manifest:
    """Write `files` customer lists of `people` into `folder`; return what a correct reader finds."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    reps = list(_REPS)
    rng.shuffle(reps)
    chunks = _assign(people, files, rng)
    owners = [reps[index % len(reps)] for index in range(files)]
    # every first listing is rendered before any second one, which may copy its spelling
    rendered: list[dict[str, dict[str, str | None]]] = [{} for _ in range(files)]
    for index in range(files):
        encoding = LAYOUTS[index % len(LAYOUTS)][1]
        for person, home in chunks[index]:
            if home is None:
                values = _render(person, rng, owners[index])
                if not _encodable(values, encoding):
                    values["contact"] = render_name(person, rng, "plain")
                rendered[index][person.person_id] = values
    results: list[LandingFile] = []
    workbooks = 0
    for index in range(files):
        fmt, encoding = LAYOUTS[index % len(LAYOUTS)]
        owner = owners[index]
        items = []
        for person, home in chunks[index]:
            if home is None:
                values = dict(rendered[index][person.person_id])
            else:
                values = _render(person, rng, owner)
                if rng.random() < 0.5:   # the second rep copied the first rep's line (same key)
                    values.update({k: rendered[home][person.person_id][k] for k in KEY_FIELDS})
                if not _encodable(values, encoding):
                    values["contact"] = render_name(person, rng, "plain")
            values["owner"] = owner
            items.append((person, values))
        headers = HEADER_SETS[index % len(HEADER_SETS)]
        name = f"{index + 1:02d}_{owner}_客户名单.{fmt}" if headers["company"] != "Customer Name" \
            else f"{index + 1:02d}_customers_{owner}.{fmt}"
        path = folder / name
        if fmt == "xlsx":
            result = _write_xlsx(path, items, headers, owner, rng, now, merge_owner=workbooks % 2 == 1)
            workbooks += 1
        else:
            result = _write_csv(path, items, headers, owner, encoding, rng, now)
        mtime = (now - timedelta(hours=files - index)).timestamp()
        os.utime(path, (mtime, mtime))
        results.append(result)
    return Manifest(tuple(results))


def _columns(headers: dict[str, str], rng: random.Random, extras: Sequence[str]) -> list[str]:
    """Column order of one file: company first, the rest shuffled, unknown columns around them."""
    rest = [f for f in FIELDS if f != "company"]
    rng.shuffle(rest)
    cols = ["company", *rest]
    if "序号" in extras:
        cols.insert(0, "序号")
    if "备注" in extras:
        cols.append("备注")
    return cols


def _write_csv(path: Path, items, headers, owner, encoding, rng, now) -> LandingFile:
    extras = ["序号"] if encoding in ("gbk", "utf-8") else []
    if encoding in ("gb18030", "utf-8-sig"):
        extras.append("备注")
    cols = _columns(headers, rng, extras)
    lines: list[list[str]] = []
    if encoding == "gbk":   # an Excel export: title line and an empty line above the header
        lines.append([f"{now.year}年客户名单（{owner}）"] + [""] * (len(cols) - 1))
        lines.append([])
    lines.append([headers.get(c, c) for c in cols])
    header_row = len(lines)
    truth: dict[int, str] = {}
    expected: dict[int, dict[str, str | None]] = {}
    blank = 0
    for n, (person, values) in enumerate(items, start=1):
        if n > 1 and rng.random() < 0.08:
            lines.append([] if rng.random() < 0.5 else [""] * len(cols))
            blank += 1
        cells = dict(values)
        want = {f: _reader_value(values[f]) for f in FIELDS}
        if encoding == "utf-8" and values["mobile"] == person.mobile and rng.random() < 0.3:
            cells["mobile"] = person.mobile + ".0"        # a float column exported by a script
        cells["序号"] = str(n)
        if "备注" in cols:
            note = rng.choice(_BEYOND_GBK) if encoding == "gb18030" and rng.random() < 0.3 else rng.choice(_NOTES)
            cells["备注"] = note
            want["备注"] = _reader_value(note)
        if "序号" in cols:
            want["序号"] = str(n)
        lines.append(["" if cells.get(c) is None else cells[c] for c in cols])
        truth[len(lines)] = person.person_id
        expected[len(lines)] = want
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    for line in lines:
        writer.writerow(line) if line else buffer.write("\r\n")
    path.write_bytes(buffer.getvalue().encode(encoding))
    return LandingFile(path.name, "csv", encoding, owner, header_row, {f: headers[f] for f in FIELDS},
                       len(items), blank, truth, expected)


def _write_xlsx(path: Path, items, headers, owner, rng, now, *, merge_owner: bool) -> LandingFile:
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "客户台账"
    cols = _columns(headers, rng, ["备注"])
    # the mobile gets two physical columns under one merged header cell
    layout: list[str] = []
    for c in cols:
        layout.extend(["mobile", "mobile_2"] if c == "mobile" else [c])
    width = len(layout)
    sheet.cell(1, 1, f"{now.year}年华东区客户台账（{owner}）")
    sheet.merge_cells(start_row=1, start_column=1, end_row=1, end_column=width)
    for col, c in enumerate(layout, start=1):
        if c != "mobile_2":
            sheet.cell(2, col, headers.get(c, c))
    mobile_col = layout.index("mobile") + 1
    sheet.merge_cells(start_row=2, start_column=mobile_col, end_row=2, end_column=mobile_col + 1)
    owner_col = layout.index("owner") + 1
    truth: dict[int, str] = {}
    expected: dict[int, dict[str, str | None]] = {}
    blank = 0
    row = 3
    runs: list[list[int]] = []          # runs of consecutive customer rows (owner merged down each)
    for n, (person, values) in enumerate(items, start=1):
        if n > 1 and rng.random() < 0.08:
            row += 1                    # an empty row between customers
            blank += 1
            runs.append([])
        elif not runs or rng.random() < 0.3:
            runs.append([])
        runs[-1].append(row)
        want = {f: _reader_value(values[f]) for f in FIELDS}
        note = rng.choice(_NOTES)
        want["备注"] = _reader_value(note)
        cells: dict[int, object] = {}
        for col, c in enumerate(layout, start=1):
            if c == "备注":
                cells[col] = note or None
            elif c != "mobile_2":
                cells[col] = values.get(c)
        mobile = values["mobile"]
        if mobile is not None:
            if mobile == person.mobile:     # plain digits: Excel keeps them as a number
                roll = rng.random()
                cells[mobile_col] = int(mobile) if roll < 0.45 else float(mobile) if roll < 0.85 else _sci_text(mobile)
            if rng.random() < 0.25:         # typed into the right half of the merged header
                cells[mobile_col + 1], cells[mobile_col] = cells[mobile_col], None
        for col, value in cells.items():
            if value is not None:
                sheet.cell(row, col, value)
        truth[row] = person.person_id
        expected[row] = want
        row += 1
    if merge_owner:
        for run in runs:
            if len(run) > 1:
                for r in run[1:]:
                    sheet.cell(r, owner_col).value = None
                sheet.merge_cells(start_row=run[0], start_column=owner_col, end_row=run[-1], end_column=owner_col)
    buffer = io.BytesIO()
    book.properties.created = now.astimezone(timezone.utc).replace(tzinfo=None)
    book.save(buffer)
    path.write_bytes(_pin_xlsx(buffer.getvalue(), now))
    return LandingFile(path.name, "xlsx", None, owner, 2, {f: headers[f] for f in FIELDS},
                       len(items), blank, truth, expected)


def write_bad_files(folder: Path) -> list[str]:
    """Add an undecodable `.csv` and a CSV without any customer column; return their names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    garbage = "90_扫描件.csv"
    (folder / garbage).write_bytes(random.Random(20260101).randbytes(4096))
    no_header = "91_会议签到表.csv"
    (folder / no_header).write_text("序号,参会人,签到时间\r\n1,王伟,09:01\r\n2,李娜,09:05\r\n", encoding="utf-8")
    return [garbage, no_header]
