"""Read the files of one raw partition into one DataFrame, or say clearly why not.

Accepted: Parquet (``.parquet``, ``.pq``) and CSV with a header row (``.csv``, ``.csv.gz``),
UTF-8 (a BOM is fine).  Problems are collected per file as :class:`ReadIssue` (file +
problem in words) instead of tracebacks: wrong encoding, truncated or corrupt Parquet, CSV
without header or with ragged rows, string cells over ``max_field_chars``, unsupported
file types.  The caller decides what to do (quarantine + ``MalformedPartition``).

Every row keeps its provenance (file, row number inside the file) so failure messages can
point at ``part-00003.parquet row 1234`` or ``events.csv line 57``.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pandas as pd

from shoprank.data.contracts import Contract

log = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".csv.gz")


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
    file_kind: dict[str, str] = field(default_factory=dict)  # file -> "parquet" | "csv"
    file_rows: dict[str, int] = field(default_factory=dict)
    file_dtypes: dict[str, dict[str, str]] = field(default_factory=dict)
    file_bytes: dict[str, int] = field(default_factory=dict)
    issues: list[ReadIssue] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # non-fatal remarks (extra columns, ...)

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


def file_kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(CSV_SUFFIXES):
        return "csv"
    return None


def read_files(files: Mapping[str, bytes], contract: Contract, max_field_chars: int = 100_000) -> RawBatch:
    """Parse ``{name: bytes}`` (one partition) against ``contract``.  Never raises on bad data."""
    frames: list[pd.DataFrame] = []
    names: list[str] = []
    batch = RawBatch(df=pd.DataFrame(), files=[], row_file=np.zeros(0, dtype=np.int32),
                     row_in_file=np.zeros(0, dtype=np.int64))
    for name, data in files.items():
        if name.rsplit("/", 1)[-1].startswith("."):
            batch.notes.append(f"hidden file {name} ignored")
            continue
        batch.files.append(name)
        batch.file_bytes[name] = len(data)
        kind = file_kind(name)
        if kind is None:
            batch.issues.append(ReadIssue(name, "unsupported file type: expected .parquet or .csv "
                                          "(move other files out of the partition, or name metadata files with a leading '_')"))
            continue
        batch.file_kind[name] = kind
        if len(data) == 0:
            batch.issues.append(ReadIssue(name, "file is empty (0 bytes)", empty=True))
            continue
        try:
            df = _read_parquet(name, data) if kind == "parquet" else _read_csv(name, data, contract)
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
        frames.append(df)
        names.append(name)

    if frames:
        file_index = {n: i for i, n in enumerate(batch.files)}
        lengths = [len(f) for f in frames]
        batch.row_file = np.repeat(np.array([file_index[n] for n in names], dtype=np.int32), lengths)
        batch.row_in_file = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
        batch.df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)
        _note_dtype_mismatches(batch, names)
    extra = [c for c in batch.df.columns if c not in contract.all_names]
    if extra:
        batch.notes.append(f"columns not in the {contract.dataset} contract are ignored and not carried to validated/: {extra}")
    return batch


class _Unreadable(Exception):
    pass


def _read_parquet(name: str, data: bytes) -> pd.DataFrame:
    if len(data) < 12 or data[:4] != b"PAR1":
        raise _Unreadable("not a Parquet file (no PAR1 magic bytes at the start); "
                          "was a CSV/JSON file given a .parquet name?")
    if data[-4:] != b"PAR1":
        raise _Unreadable(f"truncated Parquet file ({len(data):,} bytes, footer missing): "
                          "the upload was probably interrupted; upload it again")
    try:
        return pd.read_parquet(io.BytesIO(data))
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError / others on corrupt data
        raise _Unreadable(f"corrupt Parquet file ({len(data):,} bytes): {type(exc).__name__}: {exc}") from None


def _decode(name: str, data: bytes) -> str:
    if name.lower().endswith(".gz"):
        import gzip

        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise _Unreadable(f"cannot decompress gzip: {exc}") from None
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


def _read_csv(name: str, data: bytes, contract: Contract) -> pd.DataFrame:
    text = _decode(name, data)
    first_line = text.split("\n", 1)[0].rstrip("\r")
    try:
        header = next(csv.reader([first_line]))
    except (csv.Error, StopIteration):
        header = []
    header = [h.strip() for h in header]
    if not any(h in contract.names for h in header):
        raise _Unreadable(
            f"CSV has no header row: the first line is {first_line[:120]!r}; the first line must name "
            f"the columns, e.g. {','.join(contract.names)}"
        )
    try:
        raw = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""],
                          engine="c", on_bad_lines="error")
    except pd.errors.ParserError as exc:
        raise _Unreadable(f"CSV is malformed: {exc}") from None
    except (ValueError, csv.Error) as exc:
        raise _Unreadable(f"CSV cannot be parsed: {exc}") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    dup = raw.columns[raw.columns.duplicated()].tolist()
    if dup:
        raise _Unreadable(f"CSV header names columns more than once: {dup}")
    return _coerce_csv(raw, contract)


def _coerce_csv(raw: pd.DataFrame, contract: Contract) -> pd.DataFrame:
    """CSV has no types: cast each contract column to its dtype.  Cells that do not parse
    keep their text (column becomes ``object``) so the type expectation lists those rows."""
    out = {}
    for col in raw.columns:
        s = raw[col]
        want = contract.dtypes.get(col)
        if want is None or want == "string":
            out[col] = s
            continue
        if want.startswith("datetime64"):
            parsed = pd.to_datetime(s, utc=True, errors="coerce", format="ISO8601").astype("datetime64[us, UTC]")
            boxed = pd.Timestamp
        elif want.startswith("int"):
            num = pd.to_numeric(s, errors="coerce")
            integral = num.isna() | (num == np.floor(num))
            num = num.where(integral)
            parsed = num.astype("Int64") if num.isna().any() else num.astype("int64")
            boxed = np.int64
        else:
            parsed = pd.to_numeric(s, errors="coerce").astype("float64")
            boxed = np.float64
        bad = s.notna() & parsed.isna()
        if bad.any():
            values = [s.iat[i] if bad.iat[i] else (None if pd.isna(parsed.iat[i]) else boxed(parsed.iat[i]))
                      for i in range(len(s))]
            out[col] = pd.Series(values, index=s.index, dtype=object)
        else:
            out[col] = parsed
    return pd.DataFrame(out, index=raw.index)


def _huge_fields(df: pd.DataFrame, limit: int, csv_lines: bool = False) -> str | None:
    for col in df.columns:
        s = df[col]
        if not (pd.api.types.is_string_dtype(s.dtype) or s.dtype == object):
            continue
        if s.dtype == object:
            lengths = s.map(lambda v: len(v) if isinstance(v, str) else 0)
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
    if len(names) < 2:
        return
    by_col: dict[str, set[str]] = {}
    for n in names:
        for col, t in batch.file_dtypes[n].items():
            by_col.setdefault(col, set()).add(t)
    for col, types in by_col.items():
        if len(types) > 1:
            detail = ", ".join(f"{n.rsplit('/', 1)[-1]}: {batch.file_dtypes[n].get(col, 'missing')}" for n in names)
            batch.notes.append(f"column {col!r} has different types across files ({detail})")
