"""Day-over-day drift of feedback and catalogue: PSI and Kolmogorov-Smirnov on key distributions.

The reference is the previous validated partition of the same dataset.  Metrics:

catalog
    ``price_ks``            two-sample KS statistic on prices (scipy ``ks_2samp``)
    ``price_psi``           PSI of prices binned at the reference's deciles
    ``category_mix_psi``    PSI of top-level categories (top K, rest pooled)
feedback
    ``event_type_mix_psi``  PSI of impression / click / add_to_cart / purchase shares
    ``query_mix_psi``       PSI of the queries searched (one count per request, top K)
    ``click_position_psi``  PSI of where clicks land (positions 1..N, then buckets)
    ``ctr_by_position``     largest absolute change of CTR at positions 1..N; drifts when a
                            change is over the threshold and significant (z-test, ``alpha``)

PSI reads as: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 major shift.  Categories rarer
than ``min_share`` of the reference day are pooled (PSI over many sparse bins is biased
upwards on small days).  With large
samples KS p-values are always tiny, so the KS *statistic* (largest gap between the two
CDFs) is compared to the threshold; the p-value is reported for information.

Drift warns by default (``DriftOptions.mode="warn"``): the report is written to
``reports/drift/<dataset>/dt=D.json`` and the log says what moved.  With ``mode="block"``
:func:`check_drift` raises :class:`DriftDetected`.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from shoprank.data.contracts import EVENT_TYPES
from shoprank.validation.errors import DriftDetected
from shoprank.validation.options import DriftOptions, ValidationOptions

log = logging.getLogger(__name__)

DRIFT_DATASETS = ("catalog", "feedback")
DRIFT_COLUMNS = {"catalog": ["price", "category"], "feedback": ["request_id", "query", "position", "event_type"]}
OTHER = "(other)"
EPS = 1e-4


def drift_report_key(dataset: str, day: dt.date | str) -> str:
    return f"reports/drift/{dataset}/dt={_iso(day)}.json"


def _iso(day: dt.date | str) -> str:
    return day if isinstance(day, str) else day.isoformat()


@dataclass
class DriftMetric:
    name: str
    method: str  # "psi" | "ks" | "max_abs_diff"
    value: float | None
    threshold: float
    drifted: bool
    details: dict[str, Any] = field(default_factory=dict)
    note: str | None = None  # why not evaluated

    def describe(self) -> str:
        if self.value is None:
            return f"{self.name}: not evaluated ({self.note})"
        flag = "DRIFT" if self.drifted else "ok"
        return f"{self.name} ({self.method}) = {self.value:.4f} vs threshold {self.threshold} [{flag}]"


@dataclass
class DriftReport:
    dataset: str
    day: str
    reference_day: str | None
    mode: str
    status: str  # "ok" | "drift" | "no_reference"
    metrics: list[DriftMetric] = field(default_factory=list)
    rows: int = 0
    reference_rows: int = 0
    run_id: str | None = None
    generated_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    key: str | None = None  # where it was written

    @property
    def drifted(self) -> list[DriftMetric]:
        return [m for m in self.metrics if m.drifted]

    @property
    def blocking(self) -> bool:
        return self.mode == "block" and bool(self.drifted)

    def summary(self) -> str:
        if self.status == "no_reference":
            return f"{self.dataset} dt={self.day}: no earlier validated partition to compare with; drift not evaluated"
        head = (f"{self.dataset} dt={self.day} vs dt={self.reference_day}: "
                f"{len(self.drifted)} of {len(self.metrics)} drift metrics over threshold (mode={self.mode})")
        return "\n".join([head, *("  - " + m.describe() for m in self.metrics)])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["drifted_metrics"] = [m.name for m in self.drifted]
        return d


# ---- statistics ------------------------------------------------------------------------------
def psi(reference: pd.Series, current: pd.Series, eps: float = EPS) -> float:
    """Population stability index of two count vectors indexed by category."""
    cats = reference.index.union(current.index)
    p = reference.reindex(cats, fill_value=0).astype(float)
    q = current.reindex(cats, fill_value=0).astype(float)
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    p = (p / p.sum()).clip(lower=eps)
    q = (q / q.sum()).clip(lower=eps)
    return float(((q - p) * np.log(q / p)).sum())


def _top_k_counts(ref: pd.Series, cur: pd.Series, k: int, min_share: float = 0.0) -> tuple[pd.Series, pd.Series]:
    ref_counts = ref.value_counts(dropna=False)
    top = ref_counts.iloc[:k]
    keep = set(top.index[top >= min_share * max(len(ref), 1)])

    def pool(counts: pd.Series) -> pd.Series:
        inside = counts[counts.index.isin(keep)]
        other = counts[~counts.index.isin(keep)].sum()
        out = inside.copy()
        out.index = out.index.astype(object)
        if other:
            out.loc[OTHER] = other
        return out

    return pool(ref_counts), pool(cur.value_counts(dropna=False))


def _share_table(ref: pd.Series, cur: pd.Series, limit: int = 15) -> dict[str, dict[str, float]]:
    rs, cs = ref / max(ref.sum(), 1), cur / max(cur.sum(), 1)
    cats = rs.index.union(cs.index)
    table = pd.DataFrame({"reference": rs.reindex(cats, fill_value=0), "current": cs.reindex(cats, fill_value=0)})
    table["change"] = table["current"] - table["reference"]
    table = table.reindex(table["change"].abs().sort_values(ascending=False).index).head(limit)
    return {str(k): {c: round(float(v), 5) for c, v in row.items()} for k, row in table.iterrows()}


def _psi_metric(name: str, ref: pd.Series, cur: pd.Series, opts: DriftOptions) -> DriftMetric:
    value = psi(ref, cur)
    return DriftMetric(name, "psi", round(value, 6), opts.psi_threshold, bool(value > opts.psi_threshold),
                       details={"largest_share_changes": _share_table(ref, cur)})


def _not_evaluated(name: str, method: str, threshold: float, why: str) -> DriftMetric:
    return DriftMetric(name, method, None, threshold, False, note=why)


def catalog_drift(cur: pd.DataFrame, ref: pd.DataFrame, opts: DriftOptions) -> list[DriftMetric]:
    from scipy import stats

    out: list[DriftMetric] = []
    rp, cp = ref["price"].dropna().to_numpy(float), cur["price"].dropna().to_numpy(float)
    if min(len(rp), len(cp)) < opts.min_rows:
        why = f"fewer than {opts.min_rows} prices on one of the days ({len(rp)} vs {len(cp)})"
        out += [_not_evaluated("price_ks", "ks", opts.ks_threshold, why),
                _not_evaluated("price_psi", "psi", opts.psi_threshold, why)]
    else:
        ks = stats.ks_2samp(rp, cp)
        out.append(DriftMetric("price_ks", "ks", round(float(ks.statistic), 6), opts.ks_threshold,
                               bool(ks.statistic > opts.ks_threshold),
                               details={"p_value": float(ks.pvalue), "reference_median": float(np.median(rp)),
                                        "current_median": float(np.median(cp))}))
        edges = np.unique(np.quantile(rp, np.linspace(0, 1, 11)[1:-1]))
        bins = np.concatenate([[-np.inf], edges, [np.inf]])
        labels = [f"<= {e:.2f}" for e in edges] + [f"> {edges[-1]:.2f}" if len(edges) else "all"]
        rh = pd.Series(np.histogram(rp, bins)[0], index=labels)
        ch = pd.Series(np.histogram(cp, bins)[0], index=labels)
        out.append(_psi_metric("price_psi", rh, ch, opts))
    if min(len(ref), len(cur)) < opts.min_rows:
        out.append(_not_evaluated("category_mix_psi", "psi", opts.psi_threshold, f"fewer than {opts.min_rows} rows"))
    else:
        top = lambda s: s.astype(object).where(s.notna(), "(none)").map(lambda v: str(v).split(" > ")[0])  # noqa: E731
        r, c = _top_k_counts(top(ref["category"]), top(cur["category"]), opts.top_k, opts.min_share)
        out.append(_psi_metric("category_mix_psi", r, c, opts))
    return out


def _position_bucket(pos: pd.Series, n: int) -> pd.Series:
    p = pd.to_numeric(pos, errors="coerce").fillna(0).astype("int64").to_numpy()
    labels = np.where(p <= n, p.astype(str), np.where(p <= 2 * n, f"{n + 1}-{2 * n}", f">{2 * n}"))
    return pd.Series(labels, index=pos.index)


def feedback_drift(cur: pd.DataFrame, ref: pd.DataFrame, opts: DriftOptions) -> list[DriftMetric]:
    out: list[DriftMetric] = []
    if min(len(ref), len(cur)) < opts.min_rows:
        why = f"fewer than {opts.min_rows} events on one of the days ({len(ref)} vs {len(cur)})"
        return [_not_evaluated(n, m, t, why) for n, m, t in (
            ("event_type_mix_psi", "psi", opts.psi_threshold), ("query_mix_psi", "psi", opts.psi_threshold),
            ("click_position_psi", "psi", opts.psi_threshold), ("ctr_by_position", "max_abs_diff", opts.ctr_abs_threshold))]
    types = pd.Index(list(EVENT_TYPES))
    r = ref["event_type"].value_counts().reindex(types.union(ref["event_type"].dropna().unique()), fill_value=0)
    c = cur["event_type"].value_counts().reindex(types.union(cur["event_type"].dropna().unique()), fill_value=0)
    out.append(_psi_metric("event_type_mix_psi", r, c, opts))

    def searches(df: pd.DataFrame) -> pd.Series:
        return df.drop_duplicates("request_id")["query"] if "request_id" in df.columns else df["query"]

    r, c = _top_k_counts(searches(ref), searches(cur), opts.top_k, opts.min_share)
    out.append(_psi_metric("query_mix_psi", r, c, opts))

    n = opts.ctr_positions
    rclicks, cclicks = ref[ref["event_type"] == "click"], cur[cur["event_type"] == "click"]
    if min(len(rclicks), len(cclicks)) < max(10, opts.min_rows // 10):
        out.append(_not_evaluated("click_position_psi", "psi", opts.psi_threshold,
                                  f"too few clicks ({len(rclicks)} vs {len(cclicks)})"))
    else:
        out.append(_psi_metric("click_position_psi", _position_bucket(rclicks["position"], n).value_counts(),
                               _position_bucket(cclicks["position"], n).value_counts(), opts))

    def ctr(df: pd.DataFrame) -> pd.DataFrame:
        top = df[df["position"].between(1, n) & df["event_type"].isin(["impression", "click"])]
        t = pd.crosstab(top["position"], top["event_type"]).reindex(columns=["impression", "click"], fill_value=0)
        t = t.reindex(range(1, n + 1), fill_value=0)
        t["ctr"] = t["click"] / t["impression"].where(t["impression"] > 0)
        return t

    rt, ct = ctr(ref), ctr(cur)
    ok = (rt["impression"] >= opts.min_impressions_per_position) & (ct["impression"] >= opts.min_impressions_per_position)
    # two-proportion z-test per position: a change must be large AND not sampling noise
    pooled = (rt["click"] + ct["click"]) / (rt["impression"] + ct["impression"]).where(lambda x: x > 0)
    se = np.sqrt(pooled * (1 - pooled) * (1 / rt["impression"].where(rt["impression"] > 0)
                                          + 1 / ct["impression"].where(ct["impression"] > 0)))
    diff = (ct["ctr"] - rt["ctr"])
    from scipy.stats import norm

    p_value = pd.Series(2 * norm.sf(np.abs(diff / se.where(se > 0))), index=diff.index)
    table = {int(p): {"reference_ctr": _r(rt.at[p, "ctr"]), "current_ctr": _r(ct.at[p, "ctr"]),
                      "reference_impressions": int(rt.at[p, "impression"]),
                      "current_impressions": int(ct.at[p, "impression"]), "p_value": _r(p_value.at[p], 8)}
             for p in rt.index}
    if not ok.any():
        out.append(_not_evaluated("ctr_by_position", "max_abs_diff", opts.ctr_abs_threshold,
                                  f"no position has {opts.min_impressions_per_position} impressions on both days"))
    else:
        absdiff = diff.abs()[ok]
        worst = int(absdiff.idxmax())
        value = float(absdiff.max())
        flagged = [int(p) for p in absdiff.index
                   if absdiff[p] > opts.ctr_abs_threshold and pd.notna(p_value[p]) and p_value[p] < opts.alpha]
        out.append(DriftMetric("ctr_by_position", "max_abs_diff", round(value, 6), opts.ctr_abs_threshold,
                               bool(flagged),
                               details={"worst_position": worst, "drifted_positions": flagged, "alpha": opts.alpha,
                                        "by_position": table}))
    return out


def _r(v: Any, digits: int = 5) -> float | None:
    return None if v is None or pd.isna(v) else round(float(v), digits)


def compute_drift(
    current: pd.DataFrame,
    reference: pd.DataFrame | None,
    dataset: str,
    options: DriftOptions | ValidationOptions | None = None,
    day: dt.date | str = "",
    reference_day: dt.date | str | None = None,
    run_id: str | None = None,
) -> DriftReport:
    """Compare two days of ``dataset`` (pure; nothing is read or written)."""
    opts = options.drift if isinstance(options, ValidationOptions) else (options or DriftOptions())
    if dataset not in DRIFT_DATASETS:
        raise ValueError(f"drift is computed for {DRIFT_DATASETS}, not {dataset!r}")
    report = DriftReport(dataset=dataset, day=_iso(day), reference_day=_iso(reference_day) if reference_day else None,
                         mode=opts.mode, status="no_reference", rows=len(current),
                         reference_rows=0 if reference is None else len(reference), run_id=run_id)
    if reference is None:
        return report
    report.metrics = (catalog_drift if dataset == "catalog" else feedback_drift)(current, reference, opts)
    report.status = "drift" if report.drifted else "ok"
    return report


# ---- storage glue ----------------------------------------------------------------------------
def previous_partition(storage, zone: str, dataset: str, day: dt.date | str) -> str | None:
    """The latest complete partition strictly before ``day`` (or None)."""
    earlier = [d for d in storage.list_partitions(zone, dataset) if d < _iso(day)]
    return earlier[-1] if earlier else None


def read_columns(storage, zone: str, dataset: str, day: str, columns: list[str]) -> pd.DataFrame:
    """Only ``columns`` of a partition's Parquet files (cheaper than the whole partition)."""
    frames = []
    for key in storage.partition_files(zone, dataset, day):
        if key.endswith(".parquet"):
            frames.append(pd.read_parquet(io.BytesIO(storage.get_bytes(key)), columns=columns))
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def write_drift_report(storage, report: DriftReport) -> str:
    key = drift_report_key(report.dataset, report.day)
    report.key = key
    storage.put_bytes(key, json.dumps(report.to_dict(), indent=2, default=str).encode(), "application/json")
    return key


def check_drift(
    storage,
    dataset: str,
    day: dt.date | str,
    options: ValidationOptions | None = None,
    run_id: str | None = None,
    current: pd.DataFrame | None = None,
    raise_on_block: bool = True,
) -> DriftReport:
    """Drift of ``dataset`` at ``day`` vs the previous validated partition; writes the JSON report.

    ``current`` defaults to the validated partition of ``day``.  Logs a warning per drifted
    metric; raises :class:`DriftDetected` when drift mode is ``block`` (and ``raise_on_block``).
    """
    options = options or ValidationOptions.from_env()
    day = _iso(day)
    cols = DRIFT_COLUMNS[dataset]
    if current is None:
        current = read_columns(storage, "validated", dataset, day, cols)
    ref_day = previous_partition(storage, "validated", dataset, day)
    reference = read_columns(storage, "validated", dataset, ref_day, cols) if ref_day else None
    report = compute_drift(current[[c for c in cols if c in current.columns]], reference, dataset, options,
                           day=day, reference_day=ref_day, run_id=run_id)
    write_drift_report(storage, report)
    for m in report.drifted:
        log.warning("drift in %s dt=%s: %s", dataset, day, m.describe())
    log.info("%s (report %s)", report.summary(), storage.uri(report.key))
    if report.blocking and raise_on_block:
        raise DriftDetected(f"blocking drift: {report.summary()}\nreport: {storage.uri(report.key)}", None, report)
    return report
