"""Run the suites: on a DataFrame (:func:`validate_frame`) or on a raw S3 partition
(:func:`validate_partition`: read, validate, Data Docs, drift, then promote or quarantine).

No Airflow here: the DAG task calls :func:`validate_partition` and maps its exceptions
(``EmptyPartition`` and its subclass ``IncompletePartition`` -> skip, ``ValidationFailed`` ->
fail with the message).

One refusal path: whatever is wrong with a batch (a file that cannot be read, a cell that does
not fit its type, a failed expectation, blocking drift, or an unexpected error while checking
it) ends in :func:`_refuse`: the raw files are copied byte for byte to
``quarantine/<dataset>/dt=<day>/<run>/`` with ``_validation_report.json`` and
``_validation_report.md``, raw is left untouched, and a :class:`ValidationFailed` carries a
message naming the check, the file, the row, the column and the value as written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from shoprank.data.contracts import CONTRACTS
from shoprank.storage import StorageError, _date_str, partition_prefix, quarantine_prefix
from shoprank.validation.drift import (
    DRIFT_COLUMNS,
    DRIFT_DATASETS,
    DriftReport,
    compute_drift,
    previous_partition,
    read_columns,
    write_drift_report,
)
from shoprank.validation.errors import (
    DriftDetected,
    EmptyPartition,
    IncompletePartition,
    MalformedPartition,
    ValidationError,
    ValidationFailed,
)
from shoprank.validation.options import ValidationOptions
from shoprank.validation.reading import RawBatch, ReadIssue, read_files, read_frame, short_repr
from shoprank.validation.suites import (
    DERIVED_PREFIX,
    SUITES,
    add_derived_columns,
    build_suite,
    contract_for,
    strip_derived,
    suite_parameters,
)

log = logging.getLogger(__name__)

DATASOURCE = "shoprank"
DOCS_PREFIX = "reports/data-docs/"
DOCS_INDEX_KEY = DOCS_PREFIX + "index.html"
GX_STORE_PREFIX = "reports/gx-validation-store/"  # GX validation results behind the Data Docs index
REPORT_JSON = "_validation_report.json"
REPORT_MD = "_validation_report.md"
VALIDATED_SUMMARY = "_validation.json"
RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 20}

_GX: tuple[Any, Any] | None = None
_LOCK = threading.RLock()
_EPHEMERAL: Any = None
_DEFINITIONS: dict[str, Any] = {}


# ---- GX plumbing ---------------------------------------------------------------------------
def gx_modules() -> tuple[Any, Any]:
    """``(great_expectations, great_expectations.expectations)``, imported once (takes ~4 s)."""
    global _GX
    if _GX is None:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no phoning home from tasks
        import great_expectations as gx
        import great_expectations.expectations as gxe

        _GX = (gx, gxe)
    return _GX


def _quiet(ctx: Any) -> Any:
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return ctx


def _options_fingerprint(dataset: str, options: ValidationOptions) -> str:
    d = options.public_dict()
    d.pop("now", None)
    return hashlib.sha1(json.dumps([dataset, d], sort_keys=True, default=str).encode()).hexdigest()[:10]


def _add_definition(ctx: Any, dataset: str, options: ValidationOptions, suite_name: str, asset_name: str):
    gx, _ = gx_modules()
    asset = ctx.data_sources.get(DATASOURCE).add_dataframe_asset(asset_name)
    batch_def = asset.add_batch_definition_whole_dataframe("whole_partition")
    suite = ctx.suites.add(build_suite(dataset, options, name=suite_name))
    return ctx.validation_definitions.add(gx.ValidationDefinition(name=suite_name, data=batch_def, suite=suite))


def _cached_definition(dataset: str, options: ValidationOptions):
    """One ephemeral context per process; one validation definition per (dataset, options)."""
    global _EPHEMERAL
    with _LOCK:
        gx, _ = gx_modules()
        if _EPHEMERAL is None:
            _EPHEMERAL = _quiet(gx.get_context(mode="ephemeral"))
            _EPHEMERAL.data_sources.add_pandas(DATASOURCE)
        name = f"{dataset}-{_options_fingerprint(dataset, options)}"
        if name not in _DEFINITIONS:
            _DEFINITIONS[name] = _add_definition(_EPHEMERAL, dataset, options, name, name)
        return _DEFINITIONS[name]


def _run_id(run_id: str, when: dt.datetime):
    from great_expectations.core.run_identifier import RunIdentifier

    return RunIdentifier(run_name=safe_run_id(run_id), run_time=when)


def safe_run_id(run_id: str) -> str:
    """``run_id`` as one safe path segment: ASCII letters, digits and ``-_.=`` only, no ``..``,
    no leading dot, at most 150 characters (``manual__2026-11-23T09:00:00+00:00`` ->
    ``manual__2026-11-23T09_00_00_00_00``; ``../../x`` -> ``____x``)."""
    text = re.sub(r"[^A-Za-z0-9_.=-]", "_", str(run_id))
    text = re.sub(r"\.{2,}", "_", text).lstrip(".")
    if len(text) > 150:
        text = text[:139] + "-" + hashlib.sha1(str(run_id).encode()).hexdigest()[:10]
    return text or "run"


# ---- outcome ---------------------------------------------------------------------------------
@dataclass
class CheckFailure:
    """One failing expectation, in words."""

    check: str  # readable name from the suite (meta["check"])
    expectation: str  # GX expectation type
    column: str | None
    summary: str
    unexpected_count: int | None = None
    unexpected_percent: float | None = None
    examples: list[str] = field(default_factory=list)  # "part-00000.parquet row 5: event_id='e5', ..."
    error: str | None = None  # the expectation could not be evaluated

    def describe(self) -> str:
        col = f" on column {self.column!r}" if self.column else ""
        lines = [f"{self.check} ({self.expectation}{col}): {self.summary}"]
        lines += [f"    e.g. {e}" for e in self.examples]
        return "\n".join(lines)


@dataclass
class ValidationOutcome:
    """What a validation run found and where everything went."""

    dataset: str
    day: str
    run_id: str
    success: bool
    status: str  # passed | failed | malformed | empty | drift
    row_count: int = 0
    files: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)  # check name -> passed
    failures: list[CheckFailure] = field(default_factory=list)
    read_issues: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)  # "key: why it is not data", skipped by rule
    stray_folders: list[str] = field(default_factory=list)  # "key: problem" of malformed partition folders
    parameters: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    raw_prefix: str | None = None
    validated_prefix: str | None = None
    quarantine_prefix: str | None = None
    report_key: str | None = None
    docs_index_key: str | None = None  # reports/data-docs/index.html
    docs_page_key: str | None = None  # this run's validation page
    drift: dict[str, Any] | None = None
    drift_report_key: str | None = None
    duration_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    bucket: str | None = None
    engine: str = "pandas"  # pandas | spark (shoprank.spark.choose_engine)

    @property
    def failed_checks(self) -> list[str]:
        return [f.check for f in self.failures]

    def uri(self, key: str | None) -> str | None:
        return None if key is None else (f"s3://{self.bucket}/{key}" if self.bucket else key)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failed_checks"] = self.failed_checks
        return d

    def headline(self) -> str:
        where = f"{self.dataset} dt={self.day} (run {self.run_id})"
        if self.status == "passed":
            return f"{where} passed {len(self.checks)} checks on {self.row_count:,} rows"
        if self.status == "malformed":
            return f"{where}: {len(self.read_issues)} file(s) could not be read"
        if self.status == "empty":
            return f"{where}: empty partition, the files hold zero rows (the daily run skips this day)"
        if self.status == "drift":
            return f"{where}: blocking drift"
        if self.status == "error":
            return f"{where}: the batch could not be checked (an unexpected error), so it is refused"
        return f"{where} failed validation: {len(self.failures)} of {len(self.checks)} checks failed on {self.row_count:,} rows"

    def summary(self) -> str:
        """A few lines for a task log or the CLI: result, where the data and reports are."""
        lines = [self.headline()]
        if self.validated_prefix:
            lines.append(f"validated: {self.uri(self.validated_prefix)}")
        if self.quarantine_prefix:
            lines.append(f"quarantined: {self.uri(self.quarantine_prefix)}")
        if self.docs_index_key:
            lines.append(f"Data Docs: {self.uri(self.docs_index_key)} (this run: {self.uri(self.docs_page_key)})")
        if self.drift:
            lines.append(f"drift ({self.uri(self.drift_report_key)}): {self.drift.get('summary', '')}")
        if self.ignored_keys:
            lines.append(f"ignored (not data, by rule): {len(self.ignored_keys)} key(s), listed in the report")
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"warning: not a partition, ignored: {k}" for k in self.stray_folders]
        return "\n".join(lines)

    def message(self) -> str:
        """The text of the exception / task log: every failure with examples, then where things are."""
        lines = [self.headline()]
        lines += [f"  - {i}" for i in self.read_issues]
        for f in self.failures:
            lines.append("  - " + f.describe().replace("\n", "\n  "))
        if self.drift and self.status == "drift":
            lines += ["  - " + m for m in self.drift.get("summary", "").splitlines()[1:]]
        if self.quarantine_prefix:
            lines.append(f"Batch and report copied to {self.uri(self.quarantine_prefix)} "
                         f"({REPORT_MD}); {self.uri(self.raw_prefix)} is left untouched.")
        else:
            lines += [f"  ! {w}" for w in self.warnings if w.startswith("quarantine copy")]
        if self.docs_page_key:
            lines.append(f"Data Docs: {self.uri(self.docs_page_key)}")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        ok = "PASSED" if self.success else self.status.upper()
        out = [f"# Validation report: {self.dataset} dt={self.day}", "",
               f"- status: **{ok}**", f"- run: `{self.run_id}`", f"- rows: {self.row_count:,}",
               f"- source: `{self.uri(self.raw_prefix)}` (left untouched)"]
        if self.quarantine_prefix:
            out.append(f"- quarantined copy: `{self.uri(self.quarantine_prefix)}`")
        if self.docs_page_key:
            out.append(f"- Data Docs page: `{self.uri(self.docs_page_key)}`")
        out += ["", "## Files", ""] + [f"- `{f}`" for f in self.files]
        if self.read_issues:
            out += ["", "## Files that could not be read", ""] + [f"- {i}" for i in self.read_issues]
        if self.failures:
            out += ["", "## Failed checks", ""]
            for f in self.failures:
                col = f" on `{f.column}`" if f.column else ""
                out += [f"### {f.check}", "", f"`{f.expectation}`{col}: {f.summary}", ""]
                if f.examples:
                    out += ["Example bad rows:", ""] + [f"- {e}" for e in f.examples] + [""]
        if self.checks:
            out += ["", "## All checks", "", "| check | result |", "| --- | --- |"]
            out += [f"| {name} | {'pass' if ok_ else '**FAIL**'} |" for name, ok_ in self.checks.items()]
        if self.warnings:
            out += ["", "## Warnings", ""] + [f"- {w}" for w in self.warnings]
        if self.ignored_keys:
            out += ["", "## Keys ignored (not data)", "",
                    "Skipped by rule: folder markers, names or folders starting with `_` or `.` "
                    "(`_SUCCESS`, `_temporary/`, `_committed_*`), checksum files (`.crc`).", ""]
            out += [f"- `{k}`" for k in self.ignored_keys]
        if self.stray_folders:
            out += ["", "## Folders that are not partitions (never validated, never 'latest')", ""]
            out += [f"- `{k}`" for k in self.stray_folders]
        if self.drift:
            out += ["", "## Drift", "", "```", self.drift.get("summary", ""), "```"]
        out += ["", "## What to do", "",
                "Fix the producer (or the files in the raw partition) and re-run the task for this day; "
                "thresholds are in `ValidationOptions` (env `SHOPRANK_VALIDATION_*`).", ""]
        return "\n".join(out)


# ---- turning GX results into words -----------------------------------------------------------
def _short(value: Any, limit: int = 60) -> str:
    return short_repr(value, limit)


def _cell(df: pd.DataFrame, batch: RawBatch, idx: int, column: str) -> str:
    """A cell for a message: as written when the batch knows it, else the (derived) value."""
    if column in batch.df.columns and len(batch.df) == len(df):
        return batch.shown(idx, column)
    return _short(df.iat[idx, df.columns.get_loc(column)])


def _type_detail(column: str | None, batch: RawBatch, want: str | None) -> str:
    info = batch.type_errors.get(column or "")
    if not info:
        return ""
    found = ", ".join(f"{k} x{v:,}" for k, v in info["found"].items())
    hints = []
    kinds = set(info["found"])
    if want == "string" and kinds & {"struct/map", "list"}:
        hints.append("nested values where the contract has text: write them as JSON text (json.dumps) or flatten them")
    if kinds & {"non-finite number", "non-finite float"}:
        hints.append("inf and nan are not numbers the contract accepts")
    if kinds & {"number out of range", "float out of int64 range", "int beyond int64"}:
        hints.append("beyond the 64-bit integer range")
    if kinds & {"number with a fraction", "float with a fraction"}:
        hints.append("an integer column cannot hold fractions")
    return f"; found {found}" + (f" ({'; '.join(hints)})" if hints else "")


def _rule(etype: str, kw: dict[str, Any]) -> str:
    def fmt(v: Any) -> Any:
        if isinstance(v, (pd.Timestamp, dt.datetime)):
            return v.isoformat()
        return int(v) if isinstance(v, float) and v.is_integer() else v

    if etype == "expect_column_values_to_be_in_set":
        return f"not in {kw.get('value_set')}"
    if etype == "expect_column_values_to_be_between":
        lo, hi = kw.get("min_value"), kw.get("max_value")
        rng = (f">= {fmt(lo)}" if hi is None else f"<= {fmt(hi)}" if lo is None
               else f"in [{fmt(lo)}, {fmt(hi)}{')' if kw.get('strict_max') else ']'}")
        return f"not {rng}"
    if etype == "expect_column_values_to_not_be_null":
        return "null"
    if etype == "expect_column_values_to_be_null":
        return "flagged (value should be null)"
    if etype in ("expect_column_values_to_be_unique", "expect_compound_columns_to_be_unique"):
        return "duplicated"
    if etype == "expect_column_values_to_be_json_parseable":
        return "not valid JSON"
    if etype == "expect_column_value_lengths_to_be_between":
        return f"of length outside [{fmt(kw.get('min_value'))}, {fmt(kw.get('max_value')) if kw.get('max_value') is not None else 'inf'}]"
    if etype == "expect_column_values_to_be_of_type":
        return f"not of type {kw.get('type_')}"
    return "unexpected"


def _exception_text(info: Any) -> str | None:
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "error")
    for value in info.values():
        if isinstance(value, dict) and (value.get("raised_exception") or value.get("exception_message")):
            return str(value.get("exception_message") or "error")
    return None


def _failure(er: Any, df: pd.DataFrame, batch: RawBatch, params: dict[str, Any], options: ValidationOptions,
             previous_row_count: int | None) -> CheckFailure:
    cfg = er.expectation_config
    etype, kw, meta = cfg.type, dict(cfg.kwargs), dict(cfg.meta or {})
    check = meta.get("check", etype)
    column = meta.get("column") or kw.get("column") or (",".join(kw["column_list"]) if kw.get("column_list") else None)
    res = er.result or {}
    err = _exception_text(er.exception_info)
    if err:
        first = err.strip().splitlines()[0] if err.strip() else err
        return CheckFailure(check, etype, column, f"could not be evaluated: {first}", error=err)
    if etype == "expect_table_columns_to_match_set":
        missing = ((res.get("details") or {}).get("mismatched") or {}).get("missing") or sorted(
            set(kw.get("column_set") or []) - set(res.get("observed_value") or []))
        return CheckFailure(check, etype, None, f"missing columns {missing}; found {res.get('observed_value')}")
    if etype == "expect_table_row_count_to_be_between":
        prev = f" (previous partition: {previous_row_count:,} rows)" if previous_row_count else ""
        lo, hi = kw.get("min_value"), kw.get("max_value")
        rng = f"between {lo:,} and {hi:,}" if lo is not None and hi is not None else (
            f"at least {lo:,}" if lo is not None else f"at most {hi:,}")
        return CheckFailure(check, etype, None, f"{res.get('observed_value'):,} rows, expected {rng}{prev}")
    if "unexpected_count" not in res:  # aggregate column expectation (e.g. column dtype)
        summary = f"observed {res.get('observed_value')!r}, expected {_rule(etype, kw).replace('not of', 'of')}"
        if etype == "expect_column_values_to_be_of_type" and kw.get("column"):
            per_file = {f.rsplit('/', 1)[-1]: t.get(kw["column"]) for f, t in batch.file_dtypes.items()}
            summary += f"; dtype per file: {per_file}"
        return CheckFailure(check, etype, column, summary)
    n = res.get("element_count") or len(df)
    uc = int(res.get("unexpected_count") or 0)
    pct = float(res.get("unexpected_percent_total", res.get("unexpected_percent")) or 0.0)
    mostly = kw.get("mostly", 1.0) or 1.0
    summary = f"{uc:,} of {n:,} {meta.get('unit', 'rows')} ({pct:.2f}%) {meta.get('rule') or _rule(etype, kw)}"
    if mostly < 1.0:
        summary += f"; tolerated {1 - mostly:.2%}"
    counts = res.get("partial_unexpected_counts") or []
    temporal = counts and isinstance(counts[0].get("value"), (pd.Timestamp, dt.datetime))
    indices = [int(i) for i in (res.get("partial_unexpected_index_list") or [])
               if not isinstance(i, dict) and 0 <= int(i) < len(df)]
    plain_column = column if column and "," not in column and column in df.columns else None
    if plain_column and indices and etype != "expect_compound_columns_to_be_unique":
        # the values as written (CSV text, cells that did not cast), counted over the same rows as GX's
        seen: dict[str, int] = {}
        for i in indices:
            text = _cell(df, batch, i, plain_column)
            seen[text] = seen.get(text, 0) + 1
        if not temporal:
            summary += "; values: " + ", ".join(f"{v} x{k}" for v, k in list(seen.items())[:5])
    elif counts and etype != "expect_compound_columns_to_be_unique" and not temporal:
        summary += "; values: " + ", ".join(f"{_short(c.get('value'), 40)} x{c.get('count')}" for c in counts[:5])
    if etype == "expect_column_values_to_be_of_type":
        summary += _type_detail(column, batch, "string" if kw.get("type_") == "str" else kw.get("type_"))
    show = [c for c in (meta.get("show") or []) if c in df.columns]
    if column and column in df.columns and column not in show and "," not in column and not (
            show and column.startswith(DERIVED_PREFIX)):
        show.append(column)
    examples = []
    for idx in indices[: options.max_examples]:
        values = ", ".join(f"{c}={_cell(df, batch, idx, c)}" for c in show)
        examples.append(f"{batch.where(idx)}: {values}")
    return CheckFailure(check, etype, column, summary, uc, round(pct, 4), examples)



def _params_for_report(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, (pd.Timestamp, dt.datetime)) else v) for k, v in params.items()}


def _batch_from_frame(df: pd.DataFrame, dataset: str, name: str = "<dataframe>") -> RawBatch:
    return read_frame(df, contract_for(dataset), name)


def _outcome(result: Any, dataset: str, day: str, run_id: str, df: pd.DataFrame, batch: RawBatch,
             params: dict[str, Any], options: ValidationOptions, previous_row_count: int | None) -> ValidationOutcome:
    checks: dict[str, bool] = {}
    failures: list[CheckFailure] = []
    order = {name: i for i, name in enumerate(e.meta["check"] for e in SUITES[dataset](options))}
    for er in sorted(result.results, key=lambda r: order.get((r.expectation_config.meta or {}).get("check"), 999)):
        check = (er.expectation_config.meta or {}).get("check", er.expectation_config.type)
        checks[check] = bool(er.success)
        if not er.success:
            failures.append(_failure(er, df, batch, params, options, previous_row_count))
    # a missing or mistyped column makes the other checks on it error out: fold those into
    # the root failure instead of reporting the same problem N times
    missing = {c for c in CONTRACTS[dataset].names if c not in df.columns}
    roots = {f.column: f for f in failures if f.check.endswith("_type") and f.column}
    schema = next((f for f in failures if f.check == "columns_present"), None)
    kept = []
    for f in failures:
        root = (schema if f.column in missing else roots.get(f.column)) if f.error else None
        if root is None or root is f:
            kept.append(f)
        else:
            root.summary += f"; so {f.check} could not run"
    failures = kept
    return ValidationOutcome(
        dataset=dataset, day=day, run_id=run_id, success=bool(result.success),
        status="passed" if result.success else "failed", row_count=len(df), files=list(batch.files),
        checks=checks, failures=failures, warnings=list(batch.notes), parameters=_params_for_report(params),
        options=options.public_dict(),
    )


# ---- validate a DataFrame ----------------------------------------------------------------------
def validate_frame(
    df: pd.DataFrame,
    dataset: str,
    day: dt.date | str,
    options: ValidationOptions | None = None,
    *,
    previous_row_count: int | None = None,
    catalog_product_ids: Iterable[str] | pd.Index | None = None,
    run_id: str = "adhoc",
    batch: RawBatch | None = None,
) -> ValidationOutcome:
    """Run the suite of ``dataset`` on ``df`` in memory; returns the outcome, never raises on bad data.

    ``df`` is cast to the contract cell by cell first (as a Parquet file would be), so a cell of
    the wrong type is reported on its row.  Uses one cached ephemeral GX context per process
    (fast after the first call).  Nothing is read or written.  ``catalog_product_ids=None``
    leaves referential integrity unchecked.
    """
    options = options or ValidationOptions()
    contract_for(dataset)
    day = _date_str(day)
    try:
        batch = batch or _batch_from_frame(df, dataset)
        derived = add_derived_columns(batch.df, dataset, options, catalog_product_ids)
        params = suite_parameters(dataset, day, options, previous_row_count)
        vd = _cached_definition(dataset, options)
        with _LOCK:
            result = vd.run(batch_parameters={"dataframe": derived}, expectation_parameters=params,
                            result_format=RESULT_FORMAT,
                            run_id=_run_id(run_id, dt.datetime.now(dt.timezone.utc)))
        outcome = _outcome(result, dataset, day, run_id, derived, batch, params, options, previous_row_count)
    except ValidationError:
        raise
    except Exception as exc:  # a bug or an input nobody foresaw: a refusal in words, never a traceback
        outcome = _error_outcome(exc, "validate", dict(dataset=dataset, day=day, run_id=run_id,
                                                        options=options.public_dict()), batch)
    if catalog_product_ids is None and dataset in ("judgments", "feedback"):
        outcome.warnings.append("referential integrity not checked: no catalogue product ids given")
    return outcome


def _error_outcome(exc: BaseException, stage: str, base: dict[str, Any], batch: RawBatch | None) -> ValidationOutcome:
    """The outcome of a run that could not finish: refused (status ``error``), with the cause in words."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    log.debug("validation stage %r failed", stage, exc_info=exc)
    failure = CheckFailure(
        "validation_could_not_run", "-", None,
        f"while {STAGES.get(stage, stage)}: {type(exc).__name__}: {first}. The batch is refused to be safe; "
        "the full error is in the JSON report (internal_error); please report it with the batch")
    outcome = ValidationOutcome(success=False, status="error", failures=[failure],
                                files=list(batch.files) if batch else [],
                                row_count=batch.n_rows if batch else 0, **base)
    outcome.parameters["internal_error"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]
    return outcome


STAGES = {"read": "reading the files", "prepare": "preparing the checks", "validate": "running the checks",
          "drift": "computing drift", "promote": "writing validated/"}


# ---- validate a partition in S3 ----------------------------------------------------------------
def _read_raw(storage, dataset: str, day: str, options: ValidationOptions, listing=None) -> RawBatch:
    listing = listing or storage.partition_listing("raw", dataset, day)
    files = {key: storage.get_bytes(key) for key in listing.data}
    batch = read_files(files, contract_for(dataset), options.max_field_chars)
    batch.ignored = listing.ignored_lines() + batch.ignored
    for key in listing.nested:
        batch.files.append(key)
        batch.issues.append(ReadIssue(key, "in a subfolder of the partition: only files directly under "
                                           f"{listing.prefix} are read. Move it up if it is part of the day's data, "
                                           "or into a folder whose name starts with '_' if it is not"))
    return batch


def stray_folders(storage, zone: str, dataset: str) -> list[str]:
    """``"key: problem"`` for every folder under ``<zone>/<dataset>/`` that is not a partition."""
    return [f"{key}: {problem}" for key, problem in storage.scan_partitions(zone, dataset).malformed]


def previous_row_count(storage, dataset: str, day: str) -> tuple[str | None, int | None]:
    """(day, rows) of the latest validated partition before ``day``."""
    prev = previous_partition(storage, "validated", dataset, day)
    if prev is None:
        return None, None
    prefix = partition_prefix("validated", dataset, prev)
    try:
        summary = json.loads(storage.get_bytes(prefix + VALIDATED_SUMMARY))
        return prev, int(summary["row_count"])
    except (StorageError, ValueError, KeyError, TypeError):
        rows = sum(storage.parquet_rows(key) for key in storage.partition_files("validated", dataset, prev)
                   if key.endswith(".parquet"))
        return prev, rows


def catalog_product_ids(storage, day: str) -> tuple[str | None, pd.Index | None]:
    """Product ids of the latest validated catalogue on or before ``day``."""
    days = [d for d in storage.list_partitions("validated", "catalog") if d <= day]
    if not days:
        return None, None
    ids = read_columns(storage, "validated", "catalog", days[-1], ["product_id"])["product_id"]
    return days[-1], pd.Index(ids.dropna().unique())


def _write_quarantine(storage, outcome: ValidationOutcome, gx_result: dict[str, Any] | None) -> None:
    """Copy the raw partition byte for byte + the JSON and Markdown reports to quarantine/.

    The run id becomes one safe path segment (:func:`safe_run_id`).  When S3 refuses a write,
    the refusal still goes out (with the data problem) and says the copy could not be made."""
    prefix = quarantine_prefix(outcome.dataset, outcome.day, safe_run_id(outcome.run_id))
    try:
        storage.delete_prefix(prefix)  # idempotent re-run of the same run id
        validated = partition_prefix("validated", outcome.dataset, outcome.day)
        if storage.exists(validated + "_SUCCESS"):
            outcome.warnings.append(f"{storage.uri(validated)} from an earlier successful run is left in place; "
                                    "delete it if downstream must not use it")
        outcome.quarantine_prefix = prefix
        outcome.report_key = prefix + REPORT_JSON
        copied = storage.copy_prefix(outcome.raw_prefix, prefix)
        report = outcome.to_dict()
        report["copied_files"] = copied
        report["message"] = outcome.message()
        report["gx_validation_result"] = gx_result
        storage.put_bytes(prefix + REPORT_JSON, json.dumps(report, indent=2, default=str).encode(), "application/json")
        storage.put_bytes(prefix + REPORT_MD, outcome.to_markdown().encode(), "text/markdown; charset=utf-8")
    except StorageError as exc:
        outcome.quarantine_prefix = outcome.report_key = None
        outcome.warnings.append(f"quarantine copy could not be written to {storage.uri(prefix)}: {exc}; "
                                f"{storage.uri(outcome.raw_prefix)} is left untouched")
        log.error("quarantine of %s failed: %s", outcome.raw_prefix, exc)
        return
    log.warning("quarantined %d file(s) of %s to %s", len(copied), outcome.raw_prefix, storage.uri(prefix))


def _refuse(storage, outcome: ValidationOutcome, gx_result: dict[str, Any] | None = None,
            error: type[ValidationFailed] = ValidationFailed, **extra: Any) -> None:
    """The one refusal path: quarantine byte for byte with both reports, then raise."""
    outcome.success = False
    _write_quarantine(storage, outcome, gx_result)
    raise error(outcome.message(), outcome, **extra)


def _promote(storage, outcome: ValidationOutcome, df: pd.DataFrame, gx_result: dict[str, Any] | None) -> None:
    contract = contract_for(outcome.dataset)
    clean = contract.conform(strip_derived(df))
    storage.write_partition(clean, "validated", outcome.dataset, outcome.day)
    _promote_summary(storage, outcome, gx_result)


def _promote_summary(storage, outcome: ValidationOutcome, gx_result: dict[str, Any] | None) -> None:
    """``_validation.json`` next to the validated parts (their _SUCCESS is already written)."""
    prefix = partition_prefix("validated", outcome.dataset, outcome.day)
    outcome.validated_prefix = prefix
    outcome.report_key = prefix + VALIDATED_SUMMARY
    summary = outcome.to_dict()
    summary["gx_statistics"] = (gx_result or {}).get("statistics")
    storage.put_bytes(prefix + VALIDATED_SUMMARY, json.dumps(summary, indent=2, default=str).encode(), "application/json")


def _not_found_hint(raw: str, day: str, listing, strays: list[str]) -> str:
    lines = []
    if listing.ignored:
        lines.append(f"keys there that are not data (ignored by rule): {', '.join(k for k, _ in listing.ignored[:10])}")
    same_day = [s for s in strays if day in s or day.replace("-", "") in s]
    if same_day:
        lines.append("folders that look meant for this day but are not partitions: " + "; ".join(same_day[:5]))
    return "".join(f"\n  - {line}" for line in lines)


def validate_partition(
    storage,
    dataset: str,
    day: dt.date | str,
    run_id: str,
    options: ValidationOptions | None = None,
    *,
    catalog_ids: Iterable[str] | pd.Index | None = None,
) -> ValidationOutcome:
    """Validate ``raw/<dataset>/dt=<day>/`` and promote it or quarantine it.

    - not complete (data files but no ``_SUCCESS`` marker yet): :class:`IncompletePartition`,
      nothing read, quarantined or promoted (the daily run skips the day; run it again once
      the marker exists);
    - passes: the batch (contract columns, contract dtypes, Parquet) is written to
      ``validated/<dataset>/dt=<day>/`` with ``_SUCCESS`` and ``_validation.json``;
    - fails: raw files + ``_validation_report.json`` + ``_validation_report.md`` are copied to
      ``quarantine/<dataset>/dt=<day>/<safe run_id>/`` and :class:`ValidationFailed` is raised
      (:class:`MalformedPartition` when files cannot be read, :class:`DriftDetected` for
      blocking drift; status ``error`` when checking itself failed); raw is never modified;
    - no data files / zero rows: :class:`EmptyPartition`.

    Keys that are not data (``_SUCCESS``, ``_temporary/``, ``.crc``, folder markers, ...) are
    skipped by rule and listed in the report (``ignored_keys``); folders next to the partition
    that are not ``dt=YYYY-MM-DD`` are listed too (``stray_folders``).  Only
    :class:`ValidationError` (and :class:`StorageError` when S3 itself fails) leave this function.

    Data Docs are rebuilt and uploaded under ``reports/data-docs/`` (``outcome.docs_index_key``),
    drift of feedback/catalog vs the previous validated day goes to ``reports/drift/``.
    ``catalog_ids`` overrides the product ids used for referential integrity (default: the
    latest validated catalogue on or before ``day``).
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    mark = [started]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(timings.get(name, 0.0) + now - mark[0], 3)
        mark[0] = now

    options = options or ValidationOptions.from_env()
    contract_for(dataset)
    day = _date_str(day)
    raw = partition_prefix("raw", dataset, day)

    def finish(outcome: ValidationOutcome) -> ValidationOutcome:
        outcome.duration_s = round(time.perf_counter() - started, 3)
        outcome.timings = dict(timings)
        return outcome

    base = dict(dataset=dataset, day=day, run_id=run_id, raw_prefix=raw, bucket=storage.bucket,
                options=options.public_dict())
    # 0. list: which keys are data, is the partition complete ------------------------------------
    listing = storage.partition_listing("raw", dataset, day)
    strays = stray_folders(storage, "raw", dataset)
    for line in strays:
        log.warning("not a partition, ignored: %s", line)
    if not listing.data and not listing.nested:
        raise EmptyPartition(f"{dataset} dt={day}: {storage.uri(raw)} has no data files; nothing to validate "
                             f"(the daily run skips this day){_not_found_hint(raw, day, listing, strays)}")
    if not listing.complete:
        n = len(listing.data) + len(listing.nested)
        raise IncompletePartition(
            f"{dataset} dt={day}: {storage.uri(raw)} is not complete yet: {n} data file(s) but no _SUCCESS "
            "marker (an upload still in progress?). Not validated: nothing is quarantined or promoted, and the "
            f"daily run skips this day. When the upload is complete, write the empty marker "
            f"{storage.uri(raw + '_SUCCESS')} and run validation for this day again.")
    state: dict[str, Any] = {"stage": "read", "batch": None}
    try:
        return _validate_listed(storage, dataset, day, run_id, options, catalog_ids, listing, strays, base,
                                lap, finish, state)
    except (ValidationError, StorageError):
        raise
    except Exception as exc:  # a bug or an input nobody foresaw: refuse through the one path, no traceback
        outcome = finish(_error_outcome(exc, state["stage"], base, state["batch"]))
        outcome.stray_folders = strays
        outcome.ignored_keys = listing.ignored_lines()
        _refuse(storage, outcome)
        raise  # pragma: no cover  (_refuse raises)


def _validate_listed(storage, dataset: str, day: str, run_id: str, options: ValidationOptions, catalog_ids,
                     listing, strays: list[str], base: dict[str, Any], lap, finish, state: dict[str, Any]):
    raw = base["raw_prefix"]
    if dataset == "feedback" and listing.data and not listing.nested:
        from shoprank.config import Settings
        from shoprank.spark import choose_engine

        settings = Settings.from_env()
        engine, why = choose_engine(settings.engine, listing.data, lambda: storage.sizes(raw))
        state["engine"] = engine
        log.info("feedback dt=%s: validating with %s (%s)", day, engine, why)
        if engine == "spark":
            outcome = _validate_spark(storage, settings, dataset, day, run_id, options, catalog_ids, listing,
                                      strays, base, lap, finish, state)
            if outcome is not None:
                return outcome
    # 1. read ------------------------------------------------------------------------------
    batch = state["batch"] = _read_raw(storage, dataset, day, options, listing)
    lap("read")
    where = dict(ignored_keys=list(batch.ignored), stray_folders=list(strays))
    if not batch.files:
        raise EmptyPartition(f"{dataset} dt={day}: {storage.uri(raw)} has no data files; nothing to validate "
                             f"(the daily run skips this day){_not_found_hint(raw, day, listing, strays)}")
    if batch.malformed:
        outcome = finish(ValidationOutcome(success=False, status="malformed", files=batch.files,
                                           read_issues=[str(i) for i in batch.malformed],
                                           warnings=[str(i) for i in batch.issues if i.empty] + batch.notes,
                                           **where, **base))
        _refuse(storage, outcome, error=MalformedPartition)
    if batch.n_rows == 0:
        outcome = finish(ValidationOutcome(success=False, status="empty", files=batch.files,
                                           read_issues=[str(i) for i in batch.issues], **where, **base))
        _write_quarantine(storage, outcome, None)
        raise EmptyPartition(outcome.message(), outcome)
    empties = [str(i) for i in batch.issues if i.empty]
    log.info("read %s: %d rows from %d file(s)", storage.uri(raw), batch.n_rows, len(batch.files))

    # 2. run-time inputs ------------------------------------------------------------------------
    state["stage"] = "prepare"
    warnings = list(empties)
    prev_rows, params, gx_params, ids = _run_time_inputs(storage, dataset, day, options, catalog_ids, warnings)
    derived = add_derived_columns(batch.df, dataset, options, ids)
    lap("prepare")

    # 3. validate (+ Data Docs) ---------------------------------------------------------------------
    state["stage"] = "validate"
    result, docs = _validate_with_docs(storage, dataset, day, run_id, derived, gx_params, options, warnings,
                                       lambda: _run_cached(dataset, run_id, derived, gx_params, options))
    lap("validate_and_docs" if options.build_docs else "validate")
    outcome = _outcome(result, dataset, day, run_id, derived, batch, gx_params, options, prev_rows)
    gx_result = _checked(storage, outcome, result, params, gx_params, warnings, where, docs, finish)

    # 4. drift ------------------------------------------------------------------------------
    state["stage"] = "drift"
    _drift_step(storage, outcome, gx_result, options, lap, finish,
                lambda: _drift(storage, dataset, day, run_id, batch.df, options))

    # 5. promote ----------------------------------------------------------------------------
    state["stage"] = "promote"
    lap("report")
    _promote(storage, outcome, batch.df, gx_result)
    lap("promote")
    finish(outcome)
    log.info("%s -> %s in %.1f s", outcome.headline(), storage.uri(outcome.validated_prefix), outcome.duration_s)
    return outcome


def _run_time_inputs(storage, dataset: str, day: str, options: ValidationOptions, catalog_ids,
                     warnings: list[str]) -> tuple[int | None, dict[str, Any], dict[str, Any], pd.Index | None]:
    """(previous row count, all parameters, the suite's parameters, catalogue product ids): the
    previous partition's row count and the catalogue's ids (``catalog_ids`` overrides)."""
    prev_day, prev_rows = previous_row_count(storage, dataset, day)
    params = suite_parameters(dataset, day, options, prev_rows)
    ids = None
    if dataset in ("judgments", "feedback"):
        if catalog_ids is not None:
            ids = catalog_ids if isinstance(catalog_ids, pd.Index) else pd.Index(list(catalog_ids))
        else:
            cat_day, ids = catalog_product_ids(storage, day)
            if ids is None:
                msg = f"referential integrity not checked: no validated catalogue on or before {day}"
                if options.require_catalog:  # a precondition, not a data problem: nothing is quarantined
                    raise ValidationError(f"{dataset} dt={day}: {msg} (require_catalog is set); validate the "
                                          "catalogue first")
                warnings.append(msg)
            else:
                params["catalog_partition"] = cat_day
    if prev_day:
        params["previous_partition"] = prev_day
        params["previous_row_count"] = prev_rows
    gx_params = {k: v for k, v in params.items() if k not in ("catalog_partition", "previous_partition", "previous_row_count")}
    return prev_rows, params, gx_params, ids


def _validate_with_docs(storage, dataset: str, day: str, run_id: str, frame, gx_params: dict[str, Any],
                        options: ValidationOptions, warnings: list[str], run_plain, spark: bool = False):
    """(GX result, Data Docs keys): with Data Docs when asked; a docs failure still validates."""
    if not options.build_docs:
        return run_plain(), {}
    try:
        return _run_with_data_docs(storage, dataset, day, run_id, frame, gx_params, options, spark=spark)
    except StorageError:
        raise
    except Exception as exc:  # docs are a convenience; validation must still run
        log.warning("Data Docs could not be built (%s: %s); validating without them", type(exc).__name__, exc)
        warnings.append(f"Data Docs not built: {type(exc).__name__}: {exc}")
        return run_plain(), {}


def _checked(storage, outcome: ValidationOutcome, result, params: dict[str, Any], gx_params: dict[str, Any],
             warnings: list[str], where: dict[str, Any], docs: dict[str, Any], finish,
             gx_result: dict[str, Any] | None = None) -> dict[str, Any]:
    """Complete the outcome of the checks (where, warnings, docs); refuse a failed batch.
    Returns the GX result as JSON (for the reports; ``gx_result`` when already taken)."""
    outcome.parameters.update({k: v for k, v in params.items() if k not in gx_params})
    outcome.raw_prefix, outcome.bucket = partition_prefix("raw", outcome.dataset, outcome.day), storage.bucket
    outcome.warnings = warnings + outcome.warnings
    outcome.ignored_keys, outcome.stray_folders = where["ignored_keys"], where["stray_folders"]
    outcome.docs_index_key, outcome.docs_page_key = docs.get("index"), docs.get("page")
    gx_result = gx_result if gx_result is not None else result.to_json_dict()
    for w in outcome.warnings:
        log.warning("%s dt=%s: %s", outcome.dataset, outcome.day, w)
    if not outcome.success:
        finish(outcome)
        _refuse(storage, outcome, gx_result)
    return gx_result


def _drift_step(storage, outcome: ValidationOutcome, gx_result: dict[str, Any], options: ValidationOptions, lap,
                finish, compute) -> None:
    """Drift vs the previous validated day (``compute()`` -> DriftReport) into the outcome;
    blocking drift refuses the batch, a drift error only warns unless drift mode is ``block``."""
    dataset, day = outcome.dataset, outcome.day
    if dataset not in DRIFT_DATASETS or options.drift.mode == "off":
        return
    report: DriftReport | None = None
    try:
        report = compute()
    except StorageError:
        raise
    except Exception as exc:
        if options.drift.mode == "block":
            raise
        outcome.warnings.append(f"drift not computed: {type(exc).__name__}: {exc}")
        log.warning("%s dt=%s: drift not computed (%s: %s)", dataset, day, type(exc).__name__, exc)
    lap("drift")
    if report is not None:
        outcome.drift = report.to_dict() | {"summary": report.summary()}
        outcome.drift_report_key = report.key
        if report.blocking:
            outcome.status = "drift"
            finish(outcome)
            _refuse(storage, outcome, gx_result, error=DriftDetected, report=report)


def _validate_spark(storage, settings, dataset: str, day: str, run_id: str, options: ValidationOptions, catalog_ids,
                    listing, strays: list[str], base: dict[str, Any], lap, finish,
                    state: dict[str, Any]) -> ValidationOutcome | None:
    """Steps 1-5 of ``_validate_listed`` on Spark (``spark_engine``'s docstring says what differs).
    Returns None when the files are not plain contract-typed Parquet: the pandas reader then
    reads them and explains any bad cell by file, row and column."""
    from pyspark import StorageLevel

    from shoprank.spark import SparkInput, spark_session
    from shoprank.validation import spark_engine as SE

    with SparkInput(settings, storage) as inp:
        paths = inp.paths(listing.data)
        readable = SE.spark_readable(dataset, listing.data, paths) if inp.staged else SE.Readable(ok=True)
        lap("read")
        if not readable.ok:
            log.warning("feedback dt=%s: not read on Spark: %s; the pandas reader reads it instead", day, readable.why)
            state["engine"] = "pandas"
            return None
        spark = spark_session(settings, storage=storage)
        sdf = SE.read_day(spark, dataset, paths)
        # 2. run-time inputs -------------------------------------------------------------------------
        state["stage"] = "prepare"
        too_long = [c for c, n in sdf.selectExpr(*[f"max(length(`{c.name}`)) as `{c.name}`" for c in
                                                   CONTRACTS[dataset].columns if c.dtype == "string"
                                                   and c.name in sdf.columns]).first().asDict().items()
                    if n is not None and n > options.max_field_chars]
        if too_long:
            log.warning("feedback dt=%s: cells longer than %d characters in %s: the pandas reader reports them",
                        day, options.max_field_chars, too_long)
            state["engine"] = "pandas"
            return None
        rows = readable.rows or sdf.count()
        where = dict(ignored_keys=listing.ignored_lines(), stray_folders=list(strays))
        if rows == 0:
            outcome = finish(ValidationOutcome(success=False, status="empty", files=list(listing.data), **where, **base))
            _write_quarantine(storage, outcome, None)
            raise EmptyPartition(outcome.message(), outcome)
        warnings: list[str] = []
        prev_rows, params, gx_params, ids = _run_time_inputs(storage, dataset, day, options, catalog_ids, warnings)
        derived = SE.derived_columns(spark, sdf, options, ids).persist(StorageLevel.DISK_ONLY)
        lap("prepare")
        log.info("feedback dt=%s: %d rows from %d file(s) on Spark (%s)", day, rows, len(listing.data),
                 settings.engine.spark_master)

        # 3. validate (+ Data Docs) --------------------------------------------------------------
        state["stage"] = "validate"
        when = _run_id(run_id, dt.datetime.now(dt.timezone.utc))
        try:
            result, docs = _validate_with_docs(storage, dataset, day, run_id, derived, gx_params, options, warnings,
                                               lambda: SE.run_suite(derived, gx_params, options, when),
                                               spark=True)
            lap("validate_and_docs" if options.build_docs else "validate")
            gx_result = result.to_json_dict()  # before the example rows are renumbered
            small, batch = SE.example_batch(derived, result, listing.data, readable.file_rows)
            state["batch"] = batch
            outcome = _outcome(result, dataset, day, run_id, small, batch, gx_params, options, prev_rows)
            outcome.row_count, outcome.engine = rows, "spark"
            _checked(storage, outcome, result, params, gx_params, warnings + readable.notes, where, docs, finish,
                     gx_result)

            # 4. drift: counts of both days on Spark (the events never reach pandas) ----------------
            state["stage"] = "drift"
            _drift_step(storage, outcome, gx_result, options, lap, finish,
                        lambda: _drift_spark(storage, spark, inp, dataset, day, run_id, sdf, options))

            # 5. promote: the raw files, already contract-typed (spark_readable), streamed batch by
            # batch in file order into the contract's columns and dtypes: the same files pandas writes
            state["stage"] = "promote"
            lap("report")
            if inp.staged:
                parts = SE.contract_parts(dataset, paths)
            else:  # s3a: the cluster writes the contract columns in order; the parts stream through here
                contract = contract_for(dataset)
                out_dir = inp.scratch("validated")
                cols = [c for c in contract.all_names if c in sdf.columns]
                sdf.orderBy(SE.ROW_ID).select(*cols).write.mode("overwrite").parquet(out_dir)
                parts = (contract.conform(pq_read(p)) for p in inp.written_parts(out_dir))
            storage.write_partition_parts("validated", dataset, day, parts)
            _promote_summary(storage, outcome, gx_result)
            lap("promote")
        finally:
            derived.unpersist()
    finish(outcome)
    log.info("%s -> %s in %.1f s (Spark)", outcome.headline(), storage.uri(outcome.validated_prefix),
             outcome.duration_s)
    return outcome


def pq_read(path: str) -> pd.DataFrame:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pandas()


def _drift_spark(storage, spark, inp, dataset: str, day: str, run_id: str, sdf, options: ValidationOptions):
    from shoprank.validation.drift import compute_drift
    from shoprank.validation.spark_engine import feedback_counts_spark, read_day

    n = options.drift.ctr_positions
    ref_day = previous_partition(storage, "validated", dataset, day)
    reference = None
    if ref_day:
        keys = [k for k in storage.partition_files("validated", dataset, ref_day) if k.endswith(".parquet")]
        if keys:
            reference = feedback_counts_spark(read_day(spark, dataset, inp.paths(keys, "reference")), n)
    report = compute_drift(feedback_counts_spark(sdf, n), reference, dataset, options, day=day,
                           reference_day=ref_day, run_id=run_id)
    write_drift_report(storage, report)
    for m in report.drifted:
        log.warning("drift in %s dt=%s (mode=%s): %s", dataset, day, report.mode, m.describe())
    return report


def _run_cached(dataset: str, run_id: str, df: pd.DataFrame, params: dict[str, Any], options: ValidationOptions):
    vd = _cached_definition(dataset, options)
    with _LOCK:
        return vd.run(batch_parameters={"dataframe": df}, expectation_parameters=params, result_format=RESULT_FORMAT,
                      run_id=_run_id(run_id, dt.datetime.now(dt.timezone.utc)))


def _drift(storage, dataset: str, day: str, run_id: str, df: pd.DataFrame, options: ValidationOptions) -> DriftReport:
    cols = DRIFT_COLUMNS[dataset]
    ref_day = previous_partition(storage, "validated", dataset, day)
    reference = read_columns(storage, "validated", dataset, ref_day, cols) if ref_day else None
    report = compute_drift(df[cols], reference, dataset, options, day=day, reference_day=ref_day, run_id=run_id)
    write_drift_report(storage, report)
    for m in report.drifted:
        log.warning("drift in %s dt=%s (mode=%s): %s", dataset, day, report.mode, m.describe())
    return report


# ---- Data Docs -----------------------------------------------------------------------------------
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css", ".js": "application/javascript",
                  ".json": "application/json", ".png": "image/png", ".gif": "image/gif", ".svg": "image/svg+xml",
                  ".ico": "image/x-icon", ".otf": "font/otf", ".woff": "font/woff", ".woff2": "font/woff2"}


def _run_with_data_docs(storage, dataset: str, day: str, run_id: str, df, params: dict[str, Any],
                        options: ValidationOptions, spark: bool = False):
    """Validate inside a file-backed GX context in a temp dir, build Data Docs, upload them.

    The GX validation results of earlier runs (the newest ``docs_history``) are pulled from
    ``reports/gx-validation-store/`` first so the index lists them; only new files are
    uploaded (static assets once).  Returns (result, {"index": key, "page": key}).
    """
    gx, _ = gx_modules()
    from great_expectations.checkpoint import UpdateDataDocsAction

    with tempfile.TemporaryDirectory(prefix="shoprank-gx-") as tmp:
        ctx = _quiet(gx.get_context(mode="file", project_root_dir=tmp))
        root = Path(tmp) / "gx"
        store_dir = root / "uncommitted" / "validations"
        site = root / "uncommitted" / "data_docs" / "local_site"
        pulled = _pull_history(storage, store_dir, options.docs_history)
        # GX lists on the index only results whose page exists in the local site: put
        # placeholders for the pages already in S3 (never uploaded, see _push_docs)
        placeholders = set()
        for rel in pulled:
            page_path = site / "validations" / (rel[: -len(".json")] + ".html")
            page_path.parent.mkdir(parents=True, exist_ok=True)
            page_path.write_bytes(b"")
            placeholders.add(page_path)
        result_format = RESULT_FORMAT
        if spark:  # a Spark DataFrame (validation.spark_engine): counts first, examples of failures second
            from shoprank.validation.spark_engine import SPARK_COUNT_FORMAT, add_failure_examples, add_spark_definition

            ctx.data_sources.add_spark(DATASOURCE)
            result_format = SPARK_COUNT_FORMAT
        else:
            ctx.data_sources.add_pandas(DATASOURCE)
        vd = None
        for name in SUITES:  # every suite, so the index lists all of them
            if name == dataset:
                vd = (add_spark_definition if spark else _add_definition)(ctx, dataset, options, dataset,
                                                                          f"{dataset}_{day}")
            else:
                ctx.suites.add(build_suite(name, options))
        checkpoint = ctx.checkpoints.add(gx.Checkpoint(
            name=f"validate_{dataset}", validation_definitions=[vd], result_format=result_format,
            actions=[UpdateDataDocsAction(name="update_data_docs")]))
        run = checkpoint.run(batch_parameters={"dataframe": df}, expectation_parameters=params,
                             run_id=_run_id(run_id, dt.datetime.now(dt.timezone.utc)))
        ident, result = next(iter(run.run_results.items()))
        pages = []
        if spark and add_failure_examples(result, df, params, options):
            ctx.validation_results_store.set(ident, result)  # the page shows the failures' example rows
            pages.append(ident)
        # the pages of all suites (not only this one), so the index links to every contract
        from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

        ctx.build_data_docs(site_names=["local_site"],
                            resource_identifiers=[*(ExpectationSuiteIdentifier(name=n) for n in SUITES), *pages])
        page = None
        try:
            url = ctx.get_docs_sites_urls(resource_identifier=ident, site_name="local_site")[0]["site_url"]
            page = DOCS_PREFIX + os.path.relpath(url.removeprefix("file://"), site)
        except Exception as exc:  # the page location is a convenience
            log.warning("could not locate the Data Docs page: %s", exc)
        _push_docs(storage, site, store_dir, pulled, placeholders)
    log.info("Data Docs: %s", storage.uri(DOCS_INDEX_KEY))
    return result, {"index": DOCS_INDEX_KEY, "page": page}


def _pull_history(storage, store_dir: Path, keep: int) -> set[str]:
    keys = [k for k in storage.list_keys(GX_STORE_PREFIX) if k.endswith(".json")]
    # <suite>/<run_name>/<run_time>/<batch>.json: newest run_time last
    keys.sort(key=lambda k: k.split("/")[-2])
    pulled = set()
    for key in keys[-keep:] if keep > 0 else []:
        rel = key[len(GX_STORE_PREFIX):]
        path = store_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(storage.get_bytes(key))
        pulled.add(rel)
    return pulled


def _push_docs(storage, site: Path, store_dir: Path, pulled: set[str], placeholders: set[Path]) -> None:
    for path in sorted(store_dir.rglob("*.json")):
        rel = path.relative_to(store_dir).as_posix()
        if rel not in pulled:
            storage.put_bytes(GX_STORE_PREFIX + rel, path.read_bytes(), "application/json")
    present_static = set(storage.list_keys(DOCS_PREFIX + "static/"))
    files = sorted(p for p in site.rglob("*") if p.is_file() and p not in placeholders)
    # index last, so it never links to a page that is not uploaded yet
    files.sort(key=lambda p: p.name == "index.html")
    for path in files:
        key = DOCS_PREFIX + path.relative_to(site).as_posix()
        if key.startswith(DOCS_PREFIX + "static/") and key in present_static:
            continue
        storage.put_bytes(key, path.read_bytes(), _CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream"))
