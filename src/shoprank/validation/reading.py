"""Read the files of one raw partition into one DataFrame, or say clearly why not.

Accepted: Parquet (``.parquet``, ``.pq``) and CSV with a header row (``.csv``, ``.csv.gz``),
UTF-8 (a BOM is fine).  Problems are collected per file as :class:`ReadIssue` (file +
problem in words, with a hint for the usual mistakes: a ``;`` delimiter, gzip content under
``.csv``, Parquet under ``.csv``, a column stored as the pandas index) instead of tracebacks:
wrong encoding, truncated or corrupt Parquet, CSV without header or with ragged rows, string
cells over ``max_field_chars``, unsupported file types.  The caller decides what to do
(quarantine + ``MalformedPartition``).

Keys that are not data (``_SUCCESS``, ``_temporary/``, ``_committed_*``, ``.crc``, folder
markers, hidden files: :func:`shoprank.storage.non_data_reason`) are skipped by rule and
listed in ``RawBatch.ignored``.

Every cell is cast to its contract type **per file, per cell** (:func:`conform_frame`):
CSV cells are read as text first, so a cell that does not fit (``'1e20'`` or ``'inf'`` in an
integer column, ``'nan'`` in ``price``, a struct/list/map where the contract has a string, a
non-finite float) keeps the value *as written* and is reported on its own row, in its own
file.  Lossless representations of a contract type are accepted (any integer width or a
nullable integer, integral floats for an integer column, categorical/dictionary or Arrow
strings, any timestamp unit; naive timestamps are read as UTC with a note).

Every row keeps its provenance (file, row number inside the file) so failure messages can
point at ``part-00003.parquet row 1234`` or ``events.csv line 57``.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pandas as pd

from shoprank.data.contracts import Contract
from shoprank.storage import non_data_reason

log = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".csv.gz")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TEXT_LIMIT = 80  # characters of a value shown in a message


@dataclass(frozen=True)
class ReadIssue:
    file: str
    problem: str
    empty: bool = False  # the file holds no rows (not malformed by itself)

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}"


@dataclass
class RawBatch:
    """The rows of a partition plus where each row came from."""

    df: pd.DataFrame
    files: list[str]  # every data file seen, in order (S3 keys or names)
    row_file: np.ndarray  # per row: index into ``files``
    row_in_file: np.ndarray  # per row: 0-based data row inside its file
    file_kind: dict[str, str] = field(default_factory=dict)  # file -> "parquet" | "csv" | "frame"
    file_rows: dict[str, int] = field(default_factory=dict)
    file_dtypes: dict[str, dict[str, str]] = field(default_factory=dict)  # as stored, before casting
    file_bytes: dict[str, int] = field(default_factory=dict)
    issues: list[ReadIssue] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # non-fatal remarks (extra columns, ...)
    ignored: list[str] = field(default_factory=list)  # "key: why it is not data"
    # column -> the text of each cell as written (CSV cells, cells that did not cast), aligned with df
    written: dict[str, pd.Series] = field(default_factory=dict)
    # column -> {"rows": n, "found": {type name: count}} of cells that do not fit the contract type
    type_errors: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return len(self.df)

    @property
    def malformed(self) -> list[ReadIssue]:
        return [i for i in self.issues if not i.empty]

    def where(self, index: int) -> str:
        """``part-00000.parquet row 17`` / ``events.csv line 19`` for a row of ``df``."""
        pos = int(index)
        name = self.files[int(self.row_file[pos])]
        short = name.rsplit("/", 1)[-1]
        row = int(self.row_in_file[pos])
        if self.file_kind.get(name) == "csv":
            return f"{short} line {row + 2}"  # header is line 1
        return f"{short} row {row}"

    def shown(self, index: int, column: str) -> str:
        """The value of a cell for a message: as written when known (CSV text, a cell that did
        not cast), else the parsed value."""
        text = self.written.get(column)
        if text is not None and 0 <= int(index) < len(text):
            value = text.iat[int(index)]
            if isinstance(value, str):
                return short_repr(value)
        if column not in self.df.columns or not 0 <= int(index) < len(self.df):
            return "?"
        value = self.df.iat[int(index), self.df.columns.get_loc(column)]
        if self.file_kind.get(self.files[int(self.row_file[int(index)])]) == "csv" and _is_null(value):
            return "''"  # an empty CSV cell
        return short_repr(value)


# ---- values in words -------------------------------------------------------------------------
def _is_null(v: Any) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    if isinstance(v, (float, np.floating)):
        return bool(np.isnan(v))
    if isinstance(v, np.datetime64):
        return bool(np.isnat(v))
    return False


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        return v.item()
    return v


def as_text(v: Any) -> str:
    """A cell as text, as close to what was written as we can tell."""
    if isinstance(v, str):
        return v
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            return repr(v)
    if isinstance(v, (dict, list, tuple, np.ndarray)):
        try:
            return json.dumps(_plain(v), ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            return repr(v)
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, (pd.Timestamp, dt.datetime, dt.date)):
        return v.isoformat()
    if isinstance(v, np.generic):
        return str(v.item())
    return str(v)


def short_repr(value: Any, limit: int = TEXT_LIMIT) -> str:
    """``repr`` of a value for a message, cut to ``limit`` characters; null as ``null``."""
    if isinstance(value, bytes):  # a cell that did not cast, held as bytes for validation
        value = as_text(value)
    if isinstance(value, pd.Timestamp):
        text = value.isoformat()
    elif not isinstance(value, (list, dict, tuple, np.ndarray)) and _is_null(value):
        return "null"
    else:
        text = repr(_plain(value) if isinstance(value, (np.generic, np.ndarray)) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(v: Any) -> str:
    if isinstance(v, dict):
        return "struct/map"
    if isinstance(v, (list, tuple, np.ndarray)):
        return "list"
    if isinstance(v, (bool, np.bool_)):
        return "bool"
    if isinstance(v, str):
        return "str"
    if isinstance(v, bytes):
        return "bytes"
    if isinstance(v, (int, np.integer)):
        return "int"
    if isinstance(v, (float, np.floating)):
        return "float" if math.isfinite(float(v)) else "non-finite float"
    return type(v).__name__


# ---- per-cell casting --------------------------------------------------------------------------
@dataclass
class _Cast:
    values: pd.Series  # the contract type; null where the cell is null or did not cast
    bad: np.ndarray  # bool per row: the cell holds a value that does not fit
    text: pd.Series | None  # object per row: the text as written (CSV), or None
    found: Counter  # type names of the bad cells


def _kind_of(dtype: Any) -> str:
    if isinstance(dtype, pd.CategoricalDtype):
        return "category"
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_integer_dtype(dtype):
        return "int"
    if pd.api.types.is_float_dtype(dtype):
        return "float"
    if isinstance(dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_any_dtype(dtype):
        return "datetime"
    if pd.api.types.is_string_dtype(dtype) and dtype != object:
        return "string"
    return "object"


def _cells(s: pd.Series) -> np.ndarray:
    return s.astype(object).to_numpy(dtype=object, na_value=None)


def _cast_string(s: pd.Series) -> _Cast:
    n = len(s)
    kind = _kind_of(s.dtype)
    if kind == "category":
        s = s.astype(object)
        kind = "object"
    if kind == "string":
        return _Cast(s.astype("string"), np.zeros(n, bool), None, Counter())
    if kind == "object" and pd.api.types.infer_dtype(s, skipna=True) in ("string", "empty"):
        return _Cast(s.astype("string"), np.zeros(n, bool), None, Counter())
    cells = _cells(s)
    out = np.empty(n, dtype=object)
    bad = np.zeros(n, bool)
    found: Counter = Counter()
    for i, v in enumerate(cells):
        if _is_null(v) if not isinstance(v, (list, dict, tuple, np.ndarray)) else False:
            out[i] = None
        elif isinstance(v, str):
            out[i] = str(v)
        elif isinstance(v, bytes):
            try:
                out[i] = v.decode("utf-8")
            except UnicodeDecodeError:
                bad[i], out[i] = True, None
                found["bytes (not UTF-8)"] += 1
        else:
            bad[i], out[i] = True, None
            found[_type_name(v)] += 1
    text = None
    if bad.any():
        text = pd.Series([as_text(cells[i]) if bad[i] else None for i in range(n)], index=s.index, dtype=object)
    return _Cast(pd.Series(out, index=s.index, dtype=object).astype("string"), bad, text, found)


def _from_text(s: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(stripped text cells as object array with None for null, notnull mask)."""
    cells = _cells(s)
    notnull = np.array([c is not None for c in cells], dtype=bool)
    stripped = np.array([c.strip() if isinstance(c, str) else c for c in cells], dtype=object)
    return stripped, notnull


def _int_from_scalar(v: Any) -> int | None:
    """An exact int64 from a number, or None when it does not fit (fraction, non-finite, range)."""
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, np.integer)):
        iv = int(v)
    elif isinstance(v, (float, np.floating)):
        f = float(v)
        if not math.isfinite(f) or f != math.floor(f) or not (-(2.0**63) <= f < 2.0**63):
            return None
        iv = int(f)
    elif isinstance(v, decimal.Decimal):
        if not v.is_finite() or v != v.to_integral_value():
            return None
        iv = int(v)
    else:
        return None
    return iv if INT64_MIN <= iv <= INT64_MAX else None


_PLAIN_INT = re.compile(r"[+-]?[0-9]{1,18}").fullmatch


def _int_from_text(t: str) -> int | None:
    if not t.isascii() or "_" in t:  # int() would take Unicode digits and 1_000
        return None
    try:
        return _int_from_scalar(int(t))
    except ValueError:
        pass
    try:
        return _int_from_scalar(decimal.Decimal(t))
    except (decimal.InvalidOperation, ValueError):
        return None


def _cast_int(s: pd.Series, from_text: bool) -> _Cast:
    n = len(s)
    kind = _kind_of(s.dtype)
    found: Counter = Counter()
    if kind == "int" and not from_text:
        bad = np.zeros(n, bool)
        if str(s.dtype).lower().startswith("uint"):
            bad = (s > INT64_MAX).fillna(False).to_numpy(bool)
        if bad.any():
            found["int beyond int64"] += int(bad.sum())
            cells = _cells(s)
            values = pd.Series(pd.array([None if bad[i] or cells[i] is None else int(cells[i]) for i in range(n)],
                                        dtype="Int64"), index=s.index)
            return _Cast(values, bad, _text_of(s, bad), found)
        return _Cast(s.astype("Int64"), bad, None, found)
    if kind == "float" and not from_text:
        arr = s.to_numpy(dtype="float64", na_value=np.nan)
        null = np.isnan(arr)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(arr) & (arr == np.floor(arr)) & (arr >= -(2.0**63)) & (arr < 2.0**63)
        bad = ~null & ~ok
        values = pd.array(np.where(ok, arr, 0).astype("int64"), dtype="Int64")
        values[~ok] = pd.NA
        for v in arr[bad]:
            found["non-finite float" if not math.isfinite(v) else "float out of int64 range"
                  if abs(v) >= 2.0**63 else "float with a fraction"] += 1
        return _Cast(pd.Series(values, index=s.index), bad, _text_of(s, bad), found)
    if from_text:
        cells, notnull = _from_text(s)
        parse = _int_from_text
        written = s  # the text as written (kept compact, in its own dtype)
    elif kind == "object":
        cells = _cells(s)
        notnull = np.array([not (_is_null(c) if not isinstance(c, (list, dict, tuple, np.ndarray)) else False)
                            for c in cells], dtype=bool)
        parse = _int_from_scalar
        written = None
    else:  # bool, string, datetime, category columns: the wrong type altogether
        cells = _cells(s)
        notnull = s.notna().to_numpy(bool)
        parse = lambda _v: None  # noqa: E731
        written = None
    out = pd.array([None] * n, dtype="Int64")
    bad = np.zeros(n, bool)
    parsed: list[int | None] = [None] * n
    todo = np.flatnonzero(notnull)
    if from_text and len(todo):  # fast path: plain integers of up to 18 digits always fit int64
        plain = pd.Series(cells, dtype=object).map(lambda t: isinstance(t, str) and _PLAIN_INT(t) is not None)
        plain = plain.to_numpy(bool)
        if plain.any():
            ints = pd.Series(cells[plain], dtype=object).astype("int64").to_numpy()
            for i, v in zip(np.flatnonzero(plain), ints.tolist()):
                parsed[i] = v
            todo = np.flatnonzero(notnull & ~plain)
    for i in todo:
        v = cells[i]
        iv = parse(v)
        if iv is None:
            bad[i] = True
            found[_type_name(v) if not from_text else _text_kind(v)] += 1
        else:
            parsed[i] = iv
    if any(p is not None for p in parsed):
        out = pd.array(parsed, dtype="Int64")
    text = written if written is not None else _text_of(s, bad)
    return _Cast(pd.Series(out, index=s.index), bad, text, found)


def _text_kind(t: Any) -> str:
    """What a CSV cell that did not parse as a number holds, in words."""
    if not isinstance(t, str):
        return _type_name(t)
    try:
        f = float(t)
    except ValueError:
        return "text"
    if not math.isfinite(f):
        return "non-finite number"
    if f != math.floor(f):
        return "number with a fraction"
    return "number out of range"


def _text_of(s: pd.Series, bad: np.ndarray) -> pd.Series | None:
    if not bad.any():
        return None
    cells = _cells(s)
    return pd.Series([as_text(cells[i]) if bad[i] else None for i in range(len(s))], index=s.index, dtype=object)


def _float_from_scalar(v: Any) -> float | None:
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, np.integer, float, np.floating, decimal.Decimal)):
        try:
            f = float(v)
        except (OverflowError, ValueError):
            return None
        return f if math.isfinite(f) else None
    return None


def _cast_float(s: pd.Series, from_text: bool) -> _Cast:
    n = len(s)
    kind = _kind_of(s.dtype)
    found: Counter = Counter()
    if kind in ("int", "float") and not from_text:
        arr = s.to_numpy(dtype="float64", na_value=np.nan)
        null = s.isna().to_numpy(bool) | np.isnan(arr)
        bad = ~null & ~np.isfinite(arr)
        if bad.any():
            found["non-finite float"] += int(bad.sum())
        values = pd.Series(np.where(bad, np.nan, arr), index=s.index, dtype="float64")
        return _Cast(values, bad, _text_of(s, bad), found)
    if from_text:
        cells, notnull = _from_text(s)
        written = s  # the text as written (kept compact, in its own dtype)
        plain = [c if not isinstance(c, str) or (c.isascii() and "_" not in c) else "x" for c in cells]
        num = pd.to_numeric(pd.Series(plain, index=s.index, dtype=object), errors="coerce").astype("float64")
        arr = num.to_numpy()
        bad = notnull & ~np.isfinite(arr)
        for t in cells[bad]:
            found[_text_kind(t)] += 1
        return _Cast(pd.Series(np.where(bad, np.nan, arr), index=s.index, dtype="float64"), bad, written, found)
    cells = _cells(s)
    if kind == "object":
        notnull = np.array([not (_is_null(c) if not isinstance(c, (list, dict, tuple, np.ndarray)) else False)
                            for c in cells], dtype=bool)
        parse = _float_from_scalar
    else:
        notnull = s.notna().to_numpy(bool)
        parse = lambda _v: None  # noqa: E731
    out = np.full(n, np.nan)
    bad = np.zeros(n, bool)
    for i in np.flatnonzero(notnull):
        f = parse(cells[i])
        if f is None:
            bad[i] = True
            found[_type_name(cells[i])] += 1
        else:
            out[i] = f
    return _Cast(pd.Series(out, index=s.index, dtype="float64"), bad, _text_of(s, bad), found)


def _cast_datetime(s: pd.Series, from_text: bool, want: str, notes: list[str], col: str) -> _Cast:
    n = len(s)
    kind = _kind_of(s.dtype)
    found: Counter = Counter()
    if kind == "datetime" and not from_text:
        if getattr(s.dtype, "tz", None) is None:
            notes.append(f"column {col!r} holds timestamps without a time zone: read as UTC")
            s = s.dt.tz_localize("UTC")
        values = s.dt.tz_convert("UTC").astype(want)
        return _Cast(values, np.zeros(n, bool), None, found)
    if from_text:
        cells, notnull = _from_text(s)
        written = s  # the text as written (kept compact, in its own dtype)
        parsed = pd.to_datetime(pd.Series(cells, index=s.index, dtype=object), utc=True, errors="coerce",
                                format="ISO8601")
        parsed = parsed.astype(want)
        bad = notnull & parsed.isna().to_numpy(bool)
        if bad.any():
            found["text that is not an ISO 8601 timestamp"] += int(bad.sum())
        return _Cast(parsed, bad, written, found)
    cells = _cells(s)
    notnull = s.notna().to_numpy(bool) if kind != "object" else np.array(
        [not (_is_null(c) if not isinstance(c, (list, dict, tuple, np.ndarray)) else False) for c in cells], bool)
    out: list[Any] = [pd.NaT] * n
    bad = np.zeros(n, bool)
    naive = False
    for i in np.flatnonzero(notnull):
        v = cells[i]
        if kind == "object" and isinstance(v, (pd.Timestamp, dt.datetime, dt.date)):
            try:
                ts = pd.Timestamp(v)
                if ts.tzinfo is None:
                    naive = True
                    ts = ts.tz_localize("UTC")
                out[i] = ts.tz_convert("UTC")
                continue
            except (ValueError, OverflowError):
                pass
        bad[i] = True
        found[_type_name(v)] += 1
    if naive:
        notes.append(f"column {col!r} holds timestamps without a time zone: read as UTC")
    values = pd.Series(pd.to_datetime(pd.Series(out, index=s.index, dtype=object), utc=True), index=s.index)
    return _Cast(values.astype(want), bad, _text_of(s, bad), found)


def cast_column(s: pd.Series, want: str, from_text: bool, notes: list[str] | None = None, col: str = "") -> _Cast:
    """Cast one column to the contract dtype ``want``, cell by cell; never raises on data."""
    notes = notes if notes is not None else []
    if want == "string":
        return _cast_string(s)
    if want.startswith("int"):
        return _cast_int(s, from_text)
    if want.startswith("float"):
        return _cast_float(s, from_text)
    if want.startswith("datetime64"):
        return _cast_datetime(s, from_text, want, notes, col)
    raise ValueError(f"no cast for contract dtype {want!r}")


def _hashable_text(s: pd.Series) -> pd.Series:
    """An extra (non-contract) column, made safe to carry: nested values become their text."""
    if s.dtype != object:
        return s
    cells = _cells(s)
    if not any(isinstance(c, (list, dict, tuple, np.ndarray, set)) for c in cells):
        return s
    return pd.Series([as_text(c) if isinstance(c, (list, dict, tuple, np.ndarray, set)) else c for c in cells],
                     index=s.index, dtype=object)


@dataclass
class _FileFrame:
    values: dict[str, pd.Series]  # column -> cast values (contract columns) or raw (extra columns)
    bad: dict[str, np.ndarray]
    text: dict[str, pd.Series]
    found: dict[str, Counter]
    rows: int


def _conform_file(df: pd.DataFrame, contract: Contract, from_text: bool, notes: list[str]) -> _FileFrame:
    types = {c.name: c.dtype for c in contract.columns + contract.optional_columns}
    ff = _FileFrame({}, {}, {}, {}, len(df))
    for col in df.columns:
        s = df[col]
        if not isinstance(s, pd.Series):  # a duplicated column name
            continue
        want = types.get(col)
        if want is None:
            ff.values[col] = _hashable_text(s)
            continue
        cast = cast_column(s, want, from_text and want != "string", notes, col)
        ff.values[col] = cast.values
        if cast.bad.any():
            ff.bad[col] = cast.bad
            ff.found[col] = cast.found
        if cast.text is not None:
            ff.text[col] = cast.text
    return ff


# ---- reading ---------------------------------------------------------------------------------
def file_kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(CSV_SUFFIXES):
        return "csv"
    return None


def _sniff(data: bytes) -> str | None:
    """What the bytes look like, whatever the name says."""
    head = data[:8]
    if head[:4] == b"PAR1":
        return "parquet"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf16"
    stripped = data[:200].lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped[:1] in (b"{", b"["):
        return "json"
    return None


_WRONG_CONTENT = {
    "parquet": "this is a Parquet file under a CSV name: name it .parquet",
    "gzip": "the content is gzip-compressed but the name ends in .csv: name it .csv.gz (or upload it uncompressed)",
    "zip": "the content is a ZIP archive (an Excel .xlsx workbook?), not CSV: export the sheet as CSV UTF-8",
    "json": "the content looks like JSON, not CSV: export it as CSV with a header row (or as Parquet)",
}


def read_files(files: Mapping[str, bytes], contract: Contract, max_field_chars: int = 100_000) -> RawBatch:
    """Parse ``{name: bytes}`` (one partition) against ``contract``.  Never raises on bad data."""
    per_file: list[tuple[str, _FileFrame]] = []
    batch = RawBatch(df=pd.DataFrame(), files=[], row_file=np.zeros(0, dtype=np.int32),
                     row_in_file=np.zeros(0, dtype=np.int64))
    for name, data in files.items():
        base = name.rsplit("/", 1)[-1]
        why = non_data_reason(base if not name.endswith("/") else "")
        if why is not None:
            batch.ignored.append(f"{name}: {why}")
            continue
        kind = file_kind(name)
        if kind is None and len(data) == 0:  # an empty object without a data suffix holds no data
            batch.ignored.append(f"{name}: empty object without a .parquet/.csv name (a folder marker or flag), "
                                 "not data")
            continue
        batch.files.append(name)
        batch.file_bytes[name] = len(data)
        sniffed = _sniff(data)
        if kind is None:
            hint = {"parquet": "; it is Parquet: name it .parquet", "gzip": "; it is gzip: name it .csv.gz if it is CSV",
                    "zip": "; it is a ZIP archive (Excel?): export CSV UTF-8 or Parquet"}.get(sniffed or "", "")
            batch.issues.append(ReadIssue(name, "unsupported file type: expected .parquet or .csv "
                                          "(move other files out of the partition, or name metadata files with a "
                                          f"leading '_'){hint}"))
            continue
        batch.file_kind[name] = kind
        if len(data) == 0:
            batch.issues.append(ReadIssue(name, "file is empty (0 bytes)", empty=True))
            continue
        file_notes: list[str] = []
        try:
            if kind == "parquet":
                df = _read_parquet(name, data, contract, sniffed)
            else:
                df = _read_csv(name, data, contract, sniffed)
        except _Unreadable as exc:
            batch.issues.append(ReadIssue(name, str(exc)))
            continue
        huge = _huge_fields(df, max_field_chars, csv_lines=kind == "csv")
        if huge:
            batch.issues.append(ReadIssue(name, huge))
            continue
        batch.file_rows[name] = len(df)
        batch.file_dtypes[name] = {str(c): str(t) for c, t in df.dtypes.items()}
        if len(df) == 0:
            batch.issues.append(ReadIssue(name, "file holds a header/schema but zero rows", empty=True))
            continue
        per_file.append((name, _conform_file(df, contract, kind == "csv", file_notes)))
        for note in dict.fromkeys(file_notes):
            batch.notes.append(f"{name.rsplit('/', 1)[-1]}: {note}")
    _assemble(batch, per_file, contract)
    return batch


def read_frame(df: pd.DataFrame, contract: Contract, name: str = "<dataframe>") -> RawBatch:
    """An in-memory frame as a one-file batch, cast to the contract like a Parquet file."""
    if not isinstance(df.index, pd.RangeIndex) or df.index.start != 0 or df.index.step != 1:
        df = df.reset_index(drop=True)
    batch = RawBatch(df=pd.DataFrame(), files=[name], row_file=np.zeros(0, dtype=np.int32),
                     row_in_file=np.zeros(0, dtype=np.int64), file_kind={name: "frame"},
                     file_rows={name: len(df)}, file_dtypes={name: {str(c): str(t) for c, t in df.dtypes.items()}})
    notes: list[str] = []
    _assemble(batch, [(name, _conform_file(df, contract, False, notes))], contract)
    batch.notes += list(dict.fromkeys(notes))
    return batch


def _assemble(batch: RawBatch, per_file: list[tuple[str, _FileFrame]], contract: Contract) -> None:
    """Stack the files' cast columns into ``batch.df`` (+ provenance, text as written, type errors).

    A contract column whose cells all cast gets the contract dtype (``Int64`` when an integer
    column has nulls).  A column with cells that did not cast is ``object``: its good cells
    boxed (``np.int64``, ``np.float64``, ``pd.Timestamp``, ``str``) and each bad cell holds its
    text as written (``bytes`` of that text in a string column, so it is still not a ``str``):
    the type expectation then lists exactly those rows, in their own files.
    """
    if not per_file:
        return
    names = [n for n, _ in per_file]
    lengths = [ff.rows for _, ff in per_file]
    file_index = {n: i for i, n in enumerate(batch.files)}
    batch.row_file = np.repeat(np.array([file_index[n] for n in names], dtype=np.int32), lengths)
    batch.row_in_file = np.concatenate([np.arange(k, dtype=np.int64) for k in lengths])
    total = int(sum(lengths))
    index = pd.RangeIndex(total)
    columns: list[str] = []
    for _, ff in per_file:
        columns += [c for c in ff.values if c not in columns]
    types = {c.name: c.dtype for c in contract.columns + contract.optional_columns}
    required_strings = {c.name for c in contract.columns if c.dtype == "string"}
    out: dict[str, pd.Series] = {}
    for col in columns:
        missing_in = [n for n, ff in per_file if col not in ff.values]
        if missing_in and col in contract.names:
            short = ", ".join(m.rsplit("/", 1)[-1] for m in missing_in)
            batch.notes.append(f"column {col!r} is missing from {short}: its rows there count as null")
        want = types.get(col)
        parts = []
        for _, ff in per_file:
            part = ff.values.get(col)
            if part is None:
                part = pd.Series([None] * ff.rows, dtype=object if want is None else _null_dtype(want))
            parts.append(part.reset_index(drop=True))
        if want is None:
            out[col] = pd.concat([p.astype(object) for p in parts], ignore_index=True) if len(parts) > 1 else parts[0]
            continue
        bad = np.concatenate([ff.bad.get(col, np.zeros(ff.rows, bool)) for _, ff in per_file])
        has_text = any(col in ff.text for _, ff in per_file)
        if has_text:
            texts = [ff.text[col].reset_index(drop=True) if col in ff.text else pd.Series([None] * ff.rows, dtype=object)
                     for _, ff in per_file]
            batch.written[col] = pd.concat(texts, ignore_index=True).set_axis(index)
        values = pd.concat([p.astype(_null_dtype(want)) for p in parts], ignore_index=True)
        if not bad.any():
            out[col] = _final_dtype(values, want)
            continue
        found: Counter = Counter()
        for _, ff in per_file:
            found.update(ff.found.get(col, Counter()))
        batch.type_errors[col] = {"rows": int(bad.sum()), "found": dict(found.most_common())}
        boxed = _boxed(values, want)
        text = batch.written[col]
        for i in np.flatnonzero(bad):
            t = text.iat[i] if isinstance(text.iat[i], str) else "?"
            # a string column keeps the text as bytes so that it still fails the str type check
            boxed[i] = t.encode("utf-8", "surrogatepass") if col in required_strings else t
        out[col] = pd.Series(boxed, index=index, dtype=object)
    batch.df = pd.DataFrame(out, index=index)
    extra = [c for c in batch.df.columns if c not in contract.all_names]
    if extra:
        batch.notes.append(f"columns not in the {contract.dataset} contract are ignored and not carried to "
                           f"validated/: {extra}")
    if len(names) > 1:
        _note_dtype_mismatches(batch, names)


def _null_dtype(want: str) -> str:
    return "Int64" if want.startswith("int") else want


def _final_dtype(values: pd.Series, want: str) -> pd.Series:
    if want.startswith("int"):
        return values.astype("int64") if not values.isna().any() else values.astype("Int64")
    return values.astype(want)


def _boxed(values: pd.Series, want: str) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    box = np.int64 if want.startswith("int") else np.float64 if want.startswith("float") else None
    for i, v in enumerate(values.astype(object).to_numpy(dtype=object, na_value=None)):
        if v is None or v is pd.NaT or v is pd.NA:
            out[i] = None
        elif box is not None:
            out[i] = box(v)
        else:
            out[i] = v
    return out


class _Unreadable(Exception):
    pass


def _read_parquet(name: str, data: bytes, contract: Contract, sniffed: str | None) -> pd.DataFrame:
    if len(data) < 12 or data[:4] != b"PAR1":
        if sniffed == "gzip":
            raise _Unreadable("not a Parquet file: the content is gzip-compressed (a .csv.gz named .parquet?)")
        raise _Unreadable("not a Parquet file (no PAR1 magic bytes at the start); "
                          "was a CSV/JSON file given a .parquet name?")
    if data[-4:] != b"PAR1":
        raise _Unreadable(f"truncated Parquet file ({len(data):,} bytes, footer missing): "
                          "the upload was probably interrupted; upload it again")
    try:
        df = pd.read_parquet(io.BytesIO(data))
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError / others on corrupt data
        try:  # the data may be fine and only its pandas metadata wrong (a column's type changed)
            import pyarrow.parquet as pq

            df = pq.read_table(io.BytesIO(data)).to_pandas(ignore_metadata=True)
        except Exception:
            raise _Unreadable(f"corrupt Parquet file ({len(data):,} bytes): {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(df.index, pd.RangeIndex):
        index_names = [n for n in df.index.names if n is not None]
        in_index = [n for n in index_names if n in contract.all_names and n not in df.columns]
        if in_index:
            raise _Unreadable(
                f"column(s) {in_index} are stored as the pandas index, not as columns (the frame was written "
                "with set_index(...) and to_parquet()): write df.reset_index().to_parquet(path, index=False)")
        df = df.reset_index(drop=True)
    return df


def _decode(name: str, data: bytes, sniffed: str | None) -> str:
    if name.lower().endswith(".gz"):
        import gzip

        if sniffed != "gzip":
            raise _Unreadable("cannot decompress gzip: the name ends in .gz but the content is not gzip "
                              "(plain CSV? name it .csv)")
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise _Unreadable(f"cannot decompress gzip: {exc} (truncated upload?)") from None
        sniffed = _sniff(data)
    if sniffed in _WRONG_CONTENT:
        raise _Unreadable(_WRONG_CONTENT[sniffed])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        snippet = data[max(0, exc.start - 20) : exc.start + 10]
        guess = ""
        try:
            snippet.decode("cp1252")
            guess = " (looks like Latin-1/Windows-1252)"
        except UnicodeDecodeError:
            pass
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            guess = " (looks like UTF-16)"
        raise _Unreadable(
            f"not valid UTF-8{guess}: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line}, "
            f"near {snippet!r}); re-export the file as UTF-8"
        ) from None


def _split_header(line: str, delimiter: str) -> list[str]:
    try:
        return [h.strip() for h in next(csv.reader([line], delimiter=delimiter))]
    except (csv.Error, StopIteration):
        return []


def _read_csv(name: str, data: bytes, contract: Contract, sniffed: str | None) -> pd.DataFrame:
    text = _decode(name, data, sniffed)
    first_line = text.split("\n", 1)[0].rstrip("\r")
    header = _split_header(first_line, ",")
    known = set(contract.all_names)
    if not any(h in known for h in header):
        for delimiter, word in ((";", "';' (semicolon)"), ("\t", "tab"), ("|", "'|'")):
            if sum(h in known for h in _split_header(first_line, delimiter)) >= 2:
                raise _Unreadable(
                    f"CSV uses {word} as the delimiter (header {first_line[:120]!r}); shoprank reads "
                    "comma-separated files: re-export with ',' as the delimiter (e.g. df.to_csv(path, index=False))")
        raise _Unreadable(
            f"CSV has no header row: the first line is {first_line[:120]!r}; the first line must name "
            f"the columns, e.g. {','.join(contract.names)}"
        )
    try:
        raw = pd.read_csv(io.StringIO(text), dtype=str, na_filter=False, engine="c", on_bad_lines="error")
    except pd.errors.ParserError as exc:
        raise _Unreadable(f"CSV is malformed: {exc}") from None
    except (ValueError, csv.Error) as exc:
        raise _Unreadable(f"CSV cannot be parsed: {exc}") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    dup = raw.columns[raw.columns.duplicated()].tolist()
    if dup:
        raise _Unreadable(f"CSV header names columns more than once: {dup}")
    # every cell is text; an empty cell is the only null (shown as '' in messages)
    return raw.apply(lambda s: s.mask(s == "")) if len(raw.columns) else raw


def _huge_fields(df: pd.DataFrame, limit: int, csv_lines: bool = False) -> str | None:
    for col in df.columns:
        s = df[col]
        if not isinstance(s, pd.Series) or not (pd.api.types.is_string_dtype(s.dtype) or s.dtype == object):
            continue
        if s.dtype == object:
            lengths = s.map(lambda v: len(v) if isinstance(v, (str, bytes)) else 0)
        else:
            lengths = s.str.len()
        if len(lengths) == 0:
            continue
        longest = lengths.max()
        if pd.notna(longest) and longest > limit:
            row = int(np.asarray(lengths.fillna(0)).argmax())
            where = f"line {row + 2}" if csv_lines else f"row {row}"
            return (f"column {col!r} {where} holds a {int(longest):,}-character value "
                    f"(limit {limit:,}, SHOPRANK_VALIDATION_MAX_FIELD_CHARS); a broken export or an attack?")
    return None


def _note_dtype_mismatches(batch: RawBatch, names: list[str]) -> None:
    by_col: dict[str, set[str]] = {}
    for n in names:
        for col, t in batch.file_dtypes[n].items():
            by_col.setdefault(col, set()).add(t)
    for col, types in by_col.items():
        if len(types) > 1:
            detail = ", ".join(f"{n.rsplit('/', 1)[-1]}: {batch.file_dtypes[n].get(col, 'missing')}" for n in names)
            batch.notes.append(f"column {col!r} is stored with different types across files ({detail}); "
                               "each file's cells are cast to the contract type on their own")
