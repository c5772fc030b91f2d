"""Reading a sales spreadsheet (CSV or XLSX) into records, with the rules Excel users expect.

`read_file(path, stream)` returns a `FileRead` or raises `FileRejected(field, reason)` naming the
rows and columns it looked at. Rules: CSV text encodings are detected with charset_normalizer
(UTF-8 and UTF-8 with BOM first; any GB2312/GBK reading is decoded as GB18030, its superset);
the header is the first of the first `max_header_row` rows with a required column's header;
headers match after NFKC, casefolding and removing whitespace; a header cell merged across
columns names every column of the merge (values of the same row are coalesced left to right);
a data cell merged down one column fills every row of the merge; integral numbers come out as
digits ('13800138000', never '13800138000.0' or '1.38001380000E+10'). Blank rows are skipped.
Nothing here touches a database, Airflow or the landing folder's layout (`files_source` does).
"""
from __future__ import annotations

import csv
import hashlib
import io
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING

from crm_sync.quarantine import Reject

if TYPE_CHECKING:
    from crm_sync.config import FileStream, StreamConfig

CSV_SUFFIXES = (".csv", ".txt")
XLSX_SUFFIXES = (".xlsx", ".xlsm")
_GB_FAMILY = {"gb2312", "gbk", "gb18030", "hz", "cp936"}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class FileRejected(Exception):
    """The whole file cannot be read; `field` is the missing column or 'encoding'."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


@dataclass
class FileRead:
    """What one file yielded: its records, the rows rejected and how it was read."""

    records: list[dict]
    rejects: list[Reject]
    blank_rows: int
    header_row: int                  # 1-based
    encoding: str | None             # CSV: the text encoding used; XLSX: None
    sheet: str | None                # XLSX: the sheet read; CSV: None


# --- text helpers ---------------------------------------------------------------------------------

def header_norm(text: str) -> str:
    """How header cells and header variants are compared: NFKC, casefolded, no whitespace."""
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text).strip().casefold())


def key_part(value: str | None) -> str:
    return unicodedata.normalize("NFKC", value).strip().casefold() if value else ""


def record_key(values: list[str | None]) -> str:
    """The stable record key of a row: sha1 (first 20 hex) of its normalised key-field values."""
    return hashlib.sha1("\x1f".join(key_part(v) for v in values).encode("utf-8")).hexdigest()[:20]


_DOT_ZERO = re.compile(r"([+-]?[0-9]+)\.0+")
_SCIENTIFIC = re.compile(r"[+-]?([0-9]+)(?:\.([0-9]+))?[eE][+-]?[0-9]+")


def integral_text(value: str) -> str:
    """'13800138000.0' -> '13800138000'; '1.38001380000E+10' -> '13800138000'; others unchanged.

    Scientific notation is expanded only when its mantissa spells every digit of the integer:
    '1.38E+10' is what Excel shows after it lost digits, and a plausible-looking but wrong
    phone number is worse than one the validator flags.
    """
    text = value.strip()
    match = _DOT_ZERO.fullmatch(text)
    if match:
        return match.group(1)
    match = _SCIENTIFIC.fullmatch(text)
    if match:
        try:
            number = Decimal(text)
        except InvalidOperation:
            return value
        if number != 0 and number == number.to_integral_value():
            integer = str(int(number))
            written = (match.group(1).lstrip("0") or "0") + (match.group(2) or "")
            if len(written) >= len(integer.lstrip("-+")):
                return integer
    return value


def column_letter(index: int) -> str:
    """0 -> 'A', 27 -> 'AB' (how users name spreadsheet columns)."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return letters


# --- decoding -------------------------------------------------------------------------------------

def decode_text(data: bytes) -> tuple[str, str]:
    """Decode the bytes of a text file; return (text, encoding) or raise FileRejected('encoding').

    UTF-8 (with or without BOM) is tried first because it is unambiguous. Otherwise
    charset_normalizer decides; when any of its readings is a Chinese GB encoding, GB18030 is
    used: it decodes GB2312 and GBK exactly, and short GBK files are often guessed as cp949.
    Text with NUL bytes, or more than a few control characters, is binary data and rejected
    (a single stray control character is kept in its value).
    """
    encoding: str | None = None
    if data.startswith(b"\xef\xbb\xbf"):
        encoding = "utf-8-sig"
    elif b"\x00" not in data:   # UTF-16 without a BOM is valid UTF-8 full of NULs: let the detector see it
        try:
            data.decode("utf-8")
            encoding = "utf-8"
        except UnicodeDecodeError:
            pass
    if encoding is None:
        from charset_normalizer import from_bytes

        matches = list(from_bytes(data))
        if not matches:
            raise FileRejected("encoding", "cannot decode the file: no text encoding fits its bytes "
                                           "(binary data, or an encoding that cannot be decided)")
        readings = [m.encoding.replace("_", "").lower() for m in matches]
        encoding = "gb18030" if any(r in _GB_FAMILY for r in readings) else matches[0].encoding
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise FileRejected("encoding", f"cannot decode the file as {encoding}: {exc}") from None
    controls = list(_CONTROL.finditer(text))
    if controls and ("\x00" in text or len(controls) > max(2, len(text) // 200)):
        first = next((m for m in controls if m.group() == "\x00"), controls[0])
        line = text.count("\n", 0, first.start()) + 1
        raise FileRejected("encoding", f"row {line}: control character {first.group()!r} in the text read as "
                                       f"{encoding} ({len(controls)} in all): binary data, not a CSV file")
    return text, encoding


# --- reading grids --------------------------------------------------------------------------------

@dataclass
class _Grid:
    rows: list[list[str | None]]
    encoding: str | None = None
    sheet: str | None = None
    # merged ranges as 0-based inclusive (min_row, min_col, max_row, max_col)
    merges: list[tuple[int, int, int, int]] = field(default_factory=list)


def _cells(frame) -> list[list[str | None]]:
    rows = frame.to_numpy(dtype=object, na_value=None).tolist()
    return [[None if v is None else str(v) for v in row] for row in rows]


def _read_csv(path: Path) -> _Grid:
    import pandas as pd

    text, encoding = decode_text(path.read_bytes())
    try:
        # pandas takes the column count from the first line; a title line above the header is shorter
        width = max((len(row) for row in csv.reader(io.StringIO(text))), default=0)
        if width == 0:
            return _Grid([], encoding=encoding)
        frame = pd.read_csv(io.StringIO(text), header=None, names=list(range(width)), dtype=str,
                            keep_default_na=False, skip_blank_lines=False)
    except (csv.Error, pd.errors.ParserError, ValueError) as exc:
        raise FileRejected("encoding", f"not a readable CSV file ({encoding}): {exc}") from None
    return _Grid(_cells(frame), encoding=encoding)


def _read_xlsx(path: Path, sheet: str | int) -> _Grid:
    import openpyxl
    import pandas as pd

    try:
        book = openpyxl.load_workbook(path, data_only=True)  # not read-only: merged ranges are needed
    except Exception as exc:  # noqa: BLE001 - zipfile, XML and openpyxl errors all mean "corrupted"
        raise FileRejected("encoding", f"not a readable xlsx workbook: {type(exc).__name__}: {exc}") from None
    try:
        names = book.sheetnames
        if isinstance(sheet, int):
            if not 0 <= sheet < len(names):
                raise FileRejected("sheet", f"the workbook has no sheet number {sheet + 1}; sheets: {names}")
            name = names[sheet]
        elif sheet in names:
            name = sheet
        else:
            raise FileRejected("sheet", f"the workbook has no sheet {sheet!r}; sheets: {names}")
        try:
            frame = pd.read_excel(book, sheet_name=name, engine="openpyxl", header=None, dtype=str)
        except Exception as exc:  # noqa: BLE001
            raise FileRejected("encoding", f"sheet {name!r} cannot be read: {type(exc).__name__}: {exc}") from None
        merges = [(r.min_row - 1, r.min_col - 1, r.max_row - 1, r.max_col - 1)
                  for r in book[name].merged_cells.ranges]
        return _Grid(_cells(frame), sheet=name, merges=merges)
    finally:
        book.close()


def _grid(path: Path, files: "FileStream") -> _Grid:
    suffix = path.suffix.lower()
    if suffix in XLSX_SUFFIXES:
        return _read_xlsx(path, files.sheet)
    if suffix in CSV_SUFFIXES:
        return _read_csv(path)
    raise FileRejected("encoding", f"unsupported file type {suffix!r} (expected CSV or XLSX)")


# --- header and rows ------------------------------------------------------------------------------

def _empty(value: str | None) -> bool:
    return value is None or value.strip() == ""


def _find_header(rows: list[list[str | None]], files: "FileStream") -> int:
    required = [c for c in files.columns.values() if c.required] or list(files.columns.values())
    wanted = {header_norm(h) for c in required for h in c.headers}
    searched = min(len(rows), files.max_header_row)
    for index in range(searched):
        if any(not _empty(v) and header_norm(v) in wanted for v in rows[index]):
            return index
    variants = " / ".join(h for c in required for h in c.headers)
    span = f"row 1-{searched}" if searched > 1 else "row 1"
    raise FileRejected(_first_required(files), f"{span}: no header matches {variants}")


def _first_required(files: "FileStream") -> str:
    return next((name for name, c in files.columns.items() if c.required), next(iter(files.columns)))


@dataclass
class _Plan:
    fields: dict[str, list[int]]       # canonical field -> its columns (more than one: a merged header)
    extras: dict[int, str]             # column -> record key of an unknown (or repeated) column
    headers: dict[str, str]            # canonical field -> the header text the file uses


def _plan(header: list[str | None], origin: dict[int, int], files: "FileStream", used: list[bool]) -> _Plan:
    lookup = {header_norm(h): name for name, c in files.columns.items() for h in c.headers}
    fields: dict[str, list[int]] = {}
    headers: dict[str, str] = {}
    extras: dict[int, str] = {}
    taken = set(files.columns) | {"_file", "_sheet", "_row", "_key", "_modified_at"}
    for col, text in enumerate(header):
        name = lookup.get(header_norm(text)) if not _empty(text) else None
        if name is not None and name not in fields:
            fields[name], headers[name] = [col], text.strip()
            continue
        if name is not None and origin.get(col, col) == origin.get(fields[name][0], fields[name][0]):
            fields[name].append(col)          # the same merged header cell: one field over several columns
            continue
        if _empty(text) and not used[col]:
            continue                          # an unused column (formatting, trailing commas)
        label = text.strip() if not _empty(text) else f"column {column_letter(col)}"
        if label in taken:
            label = f"{label} ({column_letter(col)})"
        taken.add(label)
        extras[col] = label
    return _Plan(fields, extras, headers)


def _fill_merges(rows: list[list[str | None]], merges: list[tuple[int, int, int, int]], header: int) -> dict[int, int]:
    """Give merged cells their top-left value where a reader means it; return column -> merge origin.

    On the header row every merged range is filled (a header spanning two columns names both).
    Below it only merges down one column are filled (an owner merged over their customers' rows);
    a data cell merged sideways stays in its first column, so a note cannot leak into the next field.
    """
    origin: dict[int, int] = {}
    for top, left, bottom, right in merges:
        if top >= len(rows):
            continue
        value = rows[top][left] if left < len(rows[top]) else None
        if top <= header <= bottom:
            for col in range(left, min(right + 1, len(rows[header]))):
                rows[header][col] = value
                origin[col] = left
        elif top > header and left == right:
            for r in range(top + 1, min(bottom + 1, len(rows))):
                rows[r][left] = value
    return origin


def read_file(path: Path, stream: "StreamConfig") -> FileRead:
    """Read one landing file into records; raise FileRejected when the whole file is unusable."""
    files = stream.files
    grid = _grid(path, files)
    rows = [[None if _empty(v) else integral_text(v) for v in row] for row in grid.rows]
    header = _find_header(rows, files)
    origin = _fill_merges(rows, grid.merges, header)
    width = max((len(r) for r in rows), default=0)
    rows = [r + [None] * (width - len(r)) for r in rows]
    used = [any(r[c] is not None for r in rows[header + 1:]) for c in range(width)]
    plan = _plan(rows[header], origin, files, used)
    for name, column in files.columns.items():
        if column.required and name not in plan.fields:
            found = [h.strip() for h in rows[header] if not _empty(h)]
            raise FileRejected(name, f"row {header + 1}: no column for {name} (expected a header "
                                     f"{' / '.join(column.headers)}); headers found: {found}")
    modified_at = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc).isoformat()
    key_labels = ", ".join(plan.headers.get(k, k) for k in files.key_fields)
    records: list[dict] = []
    rejects: list[Reject] = []
    blank = 0
    for index in range(header + 1, len(rows)):
        row = rows[index]
        if all(v is None for v in row):
            blank += 1
            continue
        record: dict = {name: None for name in files.columns}
        for name, cols in plan.fields.items():
            values = [(c, row[c]) for c in cols if row[c] is not None]
            if values:
                record[name] = values[0][1]
                for col, surplus in values[1:]:   # a second value under one merged header: kept, not lost
                    record[f"{plan.headers[name]} ({column_letter(col)})"] = surplus
        for col, label in plan.extras.items():
            record[label] = row[col]
        record.update({"_file": path.name, "_sheet": grid.sheet, "_row": index + 1,
                       "_modified_at": modified_at})
        key_values = [record.get(k) for k in files.key_fields]
        if all(v is None for v in key_values):
            rejects.append(Reject(stream.name, f"{path.name}:{index + 1}", "extract", files.key_fields[0],
                                  f"{path.name} row {index + 1}: the key columns ({key_labels}) are all empty",
                                  record))
            continue
        record["_key"] = record_key(key_values)
        records.append(record)
    return FileRead(records, rejects, blank, header + 1, grid.encoding, grid.sheet)
