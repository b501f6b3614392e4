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
    ``ctr_by_position``     largest absolute change of CTR at positions 1..N

PSI reads as: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 major shift -- for the true
distributions.  Categories (queries, top-level categories) keep their own bin when they are
among the K most frequent of the two days pooled, have at least ``min_share`` of them and an
expected count of at least ``MIN_EXPECTED`` (5, the usual chi-square rule) on the smaller day;
the rest are pooled as ``(other)`` on both days.  The bins are chosen on the pooled days,
not the reference alone: on a small reference day every query it saw would get a bin and the
current day's unseen queries would all land in ``(other)``, 0 % vs ~30 % on steady traffic.

Sample size: threshold + sampling noise
---------------------------------------
Every measure is an estimate from two finite samples, and two days drawn from the *same*
distribution still differ.  The PSI over k categories of two samples of sizes n1, n2 of one
distribution is, asymptotically, a chi-square statistic over the effective sample size::

    PSI_0 ~ (1/n1 + 1/n2) * chi2(k - 1),   E[PSI_0] = (k - 1) * (1/n1 + 1/n2)

so 300 searches a day over 40 queries give PSI ~ 0.26 on steady traffic, over the 0.2
threshold by noise alone.  With ``E0`` the expected value of a measure when nothing changed
(its sampling bias) and ``q0`` its ``1 - alpha`` quantile then, a metric drifts when the
noise-corrected change is over the threshold *and* the change is beyond sampling error (a
test of "no change" at level ``alpha``)::

    drift  <=>  value - E0 > threshold  and  value > q0
           <=>  value > threshold + noise,    noise = max(E0, q0 - threshold)

Steady traffic therefore raises an alarm with probability at most ``alpha`` per metric
whatever the day's size, and a real change larger than the threshold is flagged once the
days are large enough for it to stand out of the noise.  Per measure:

* **PSI**: ``E0`` and ``q0`` are the mean and ``1 - alpha`` quantile of the PSI of two
  multinomial samples of sizes n1, n2 from the pooled shares ``(c1 + c2) / (n1 + n2)``
  (parametric bootstrap, ``NOISE_DRAWS`` draws, fixed seed, the same :func:`psi` -- so the eps
  smoothing of empty bins, which makes small days noisier than the chi-square form, is
  included).  Asymptotically ``E0 = (k - 1)(1/n1 + 1/n2)`` and
  ``q0 = (1/n1 + 1/n2) * chi2.ppf(1 - alpha, k - 1)``; both forms and the bootstrap p-value
  are in the metric's ``details``.
* **KS** (``price_ks``): with ``s = sqrt((n1 + n2) / (n1 n2))``, ``E0 = 0.8687 s`` (mean of the
  Kolmogorov distribution, sqrt(pi/2) ln 2) and ``q0 = c(alpha) s``,
  ``c(alpha) = sqrt(-ln(alpha / 2) / 2)`` (asymptotic two-sample critical value).
* **CTR at a position** (clicks / impressions, two proportions, change ``d = ctr2 - ctr1``):
  under no change ``d ~ N(0, se^2)``, ``se = sqrt(p (1 - p) (1/n1 + 1/n2))`` with ``p`` the
  pooled CTR (the two-proportion z-test), so ``E0 = sqrt(2/pi) se`` (mean of ``|d|``) and
  ``q0 = Phi^-1(1 - alpha / (2 m)) se`` (``|d| > q0`` <=> z-test p-value < ``alpha / m``; the
  Bonferroni correction over the ``m`` positions compared keeps the metric's false-alarm rate
  at ``alpha``).  A position drifts when ``|d| > threshold + noise_p``.  The metric's value is
  the largest raw ``|d|`` and its ``noise`` is that value minus the largest
  ``|d_p| - noise_p``, so the metric's ``value > threshold + noise`` holds exactly when some
  position drifts.

``alpha`` (``SHOPRANK_DRIFT_ALPHA``, default 0.001) is shared by all measures; ``alpha >= 1``
turns the noise correction off (``noise = 0``: raw ``value > threshold``).  The thresholds
are the same settings as before (``SHOPRANK_DRIFT_PSI_THRESHOLD``, ``..._KS_THRESHOLD``,
``..._CTR_ABS_THRESHOLD``).  Each metric records the raw ``value``, the ``threshold``, the
``noise`` and a ``status`` derived from that one comparison: ``drift``, ``within_noise``
(over the raw threshold, not over threshold + noise -- printed ``[within noise: ...]``,
never ``[ok]``) or ``ok`` (at most the threshold).

With large samples KS p-values are always tiny, so the KS *statistic* (largest gap between
the two CDFs) is compared to the threshold; the p-value is reported for information.

Drift warns by default (``DriftOptions.mode="warn"``): the report is written to
``reports/drift/<dataset>/dt=D.json`` and the log says what moved.  With ``mode="block"``
:func:`check_drift` raises :class:`DriftDetected`.
"""

from __future__ import annotations

import datetime as dt
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
NOISE_DRAWS = 4000  # parametric-bootstrap draws for the PSI noise band
NOISE_SEED = 20261121  # fixed: the same two days always give the same band
KS_MEAN = float(np.sqrt(np.pi / 2) * np.log(2))  # 0.8687, mean of the Kolmogorov distribution
MIN_EXPECTED = 5.0  # a category keeps its own PSI bin when expected >= 5 times on the smaller day


def drift_report_key(dataset: str, day: dt.date | str) -> str:
    return f"reports/drift/{dataset}/dt={_iso(day)}.json"


def _iso(day: dt.date | str) -> str:
    return day if isinstance(day, str) else day.isoformat()


@dataclass
class DriftMetric:
    name: str
    method: str  # "psi" | "ks" | "max_abs_diff"
    value: float | None  # raw measure
    threshold: float
    drifted: bool  # value > threshold + noise (see module docstring)
    details: dict[str, Any] = field(default_factory=dict)
    note: str | None = None  # why not evaluated
    noise: float | None = None  # sampling-noise band added to the threshold (0: none)

    @classmethod
    def decide(cls, name: str, method: str, value: float, threshold: float, noise: float,
               details: dict[str, Any] | None = None) -> "DriftMetric":
        """The metric with ``drifted = value > threshold + noise`` (NaN value: not drifted)."""
        value, noise = float(value), float(noise)
        drifted = bool(np.isfinite(value) and value > threshold + noise)
        return cls(name, method, round(value, 6), threshold, drifted, details or {}, noise=round(noise, 6))

    @property
    def status(self) -> str:
        """``not_evaluated`` | ``drift`` | ``within_noise`` | ``ok``, from the decision's own numbers."""
        if self.value is None:
            return "not_evaluated"
        if self.drifted:
            return "drift"
        if self.value > self.threshold:
            return "within_noise"  # over the raw threshold, not beyond the sampling noise
        return "ok"

    def describe(self) -> str:
        status = self.status
        if status == "not_evaluated":
            return f"{self.name}: not evaluated ({self.note})"
        noise = self.noise or 0.0
        head = f"{self.name} ({self.method}) = {self.value:.4f} vs threshold {self.threshold} + noise {noise:.4f}"
        if status == "drift":
            return f"{head} [DRIFT]"
        if status == "within_noise":
            return (f"{head} [within noise: {self.value:.4f} > {self.threshold} but "
                    f"<= {self.threshold + noise:.4f}, not beyond sampling error]")
        return f"{head} [ok]"


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
        noisy = sum(m.status == "within_noise" for m in self.metrics)
        head = (f"{self.dataset} dt={self.day} vs dt={self.reference_day}: "
                f"{len(self.drifted)} of {len(self.metrics)} drift metrics over threshold beyond sampling noise"
                + (f", {noisy} over threshold within noise" if noisy else "") + f" (mode={self.mode})")
        return "\n".join([head, *("  - " + m.describe() for m in self.metrics)])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for m, md in zip(self.metrics, d["metrics"]):
            md["status"] = m.status
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


def _top_k_counts(ref: pd.Series, cur: pd.Series, k: int, min_share: float = 0.0,
                  min_expected: float = MIN_EXPECTED) -> tuple[pd.Series, pd.Series]:
    """Counts of the categories kept separate on both days, the rest pooled as ``(other)``.

    Kept: the ``k`` most frequent of the two days *pooled*, with a pooled share of at least
    ``min_share`` and an expected count of at least ``min_expected`` on the smaller day.  The
    choice is symmetric in the two days: choosing on the reference alone would put every
    query of a small reference day in its own bin and all of the current day's unseen ones in
    ``(other)`` (0 vs 30 % on steady traffic), a difference made by the selection, not the data.
    """
    return _top_k_of_counts(ref.value_counts(dropna=False), cur.value_counts(dropna=False), k, min_share,
                            min_expected)


def _top_k_of_counts(ref_counts: pd.Series, cur_counts: pd.Series, k: int, min_share: float = 0.0,
                     min_expected: float = MIN_EXPECTED) -> tuple[pd.Series, pd.Series]:
    """:func:`_top_k_counts` from the two days' counts per category."""
    both = ref_counts.add(cur_counts, fill_value=0).sort_values(ascending=False, kind="stable")
    n_ref, n_cur = int(ref_counts.sum()), int(cur_counts.sum())
    total, smaller = max(n_ref + n_cur, 1), min(n_ref, n_cur)
    share = both / total
    top = share.iloc[:k]
    keep = set(top.index[(top >= min_share) & (top * smaller >= min_expected)])

    def pool(counts: pd.Series) -> pd.Series:
        inside = counts[counts.index.isin(keep)]
        other = counts[~counts.index.isin(keep)].sum()
        out = inside.copy()
        out.index = out.index.astype(object)
        if other:
            out.loc[OTHER] = other
        return out

    return pool(ref_counts), pool(cur_counts)


def _share_table(ref: pd.Series, cur: pd.Series, limit: int = 15) -> dict[str, dict[str, float]]:
    rs, cs = ref / max(ref.sum(), 1), cur / max(cur.sum(), 1)
    cats = rs.index.union(cs.index)
    table = pd.DataFrame({"reference": rs.reindex(cats, fill_value=0), "current": cs.reindex(cats, fill_value=0)})
    table["change"] = table["current"] - table["reference"]
    table = table.reindex(table["change"].abs().sort_values(ascending=False).index).head(limit)
    return {str(k): {c: round(float(v), 5) for c, v in row.items()} for k, row in table.iterrows()}


def _aligned(reference: pd.Series, current: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    cats = reference.index.union(current.index)
    return (reference.reindex(cats, fill_value=0).to_numpy(float), current.reindex(cats, fill_value=0).to_numpy(float))


def psi_null(reference: pd.Series, current: pd.Series, draws: int = NOISE_DRAWS, seed: int = NOISE_SEED,
             eps: float = EPS) -> np.ndarray:
    """PSI of ``draws`` pairs of samples of the two days' sizes from their pooled shares (no change)."""
    r, c = _aligned(reference, current)
    n1, n2 = int(round(r.sum())), int(round(c.sum()))
    if n1 <= 0 or n2 <= 0:
        return np.full(draws, np.nan)
    pooled = (r + c) / (r + c).sum()
    rng = np.random.default_rng(seed)
    p = np.clip(rng.multinomial(n1, pooled, size=draws) / n1, eps, None)
    q = np.clip(rng.multinomial(n2, pooled, size=draws) / n2, eps, None)
    return ((q - p) * np.log(q / p)).sum(axis=1)


def noise_margin(expected: float, critical: float, threshold: float, alpha: float) -> float:
    """``max(E0, q0 - threshold)``: ``value > threshold + this`` <=> ``value - E0 > threshold and value > q0``."""
    if alpha >= 1:
        return 0.0
    return float(max(expected, critical - threshold))


def psi_noise(reference: pd.Series, current: pd.Series, alpha: float, value: float | None = None) -> dict[str, Any]:
    """Sampling noise of :func:`psi` for these two count vectors: ``E0``, ``q0`` (module docstring)."""
    from scipy.stats import chi2

    r, c = _aligned(reference, current)
    n1, n2, k = float(r.sum()), float(c.sum()), int(((r + c) > 0).sum())
    inv = (1 / n1 + 1 / n2) if n1 > 0 and n2 > 0 else float("nan")
    out: dict[str, Any] = {"n_reference": int(n1), "n_current": int(n2), "categories": k, "alpha": alpha,
                           "asymptotic_expected": _r((k - 1) * inv, 6),
                           "asymptotic_critical": _r(inv * chi2.ppf(1 - alpha, k - 1), 6) if 0 < alpha < 1 else None}
    if alpha >= 1 or k <= 1:
        out.update(expected=0.0, critical=0.0)
        return out
    null = psi_null(reference, current)
    out.update(expected=float(np.mean(null)), critical=float(np.quantile(null, 1 - alpha)))
    if value is not None and np.isfinite(value):
        out["p_value"] = _r((1 + int((null >= value).sum())) / (len(null) + 1), 6)
    return out


def _psi_metric(name: str, ref: pd.Series, cur: pd.Series, opts: DriftOptions) -> DriftMetric:
    value = psi(ref, cur)
    noise = psi_noise(ref, cur, opts.alpha, value)
    margin = noise_margin(noise["expected"], noise["critical"], opts.psi_threshold, opts.alpha)
    noise["expected"], noise["critical"] = _r(noise["expected"], 6), _r(noise["critical"], 6)
    return DriftMetric.decide(name, "psi", value, opts.psi_threshold, margin,
                              details={**noise, "noise_corrected": _r(value - noise["expected"], 6),
                                       "largest_share_changes": _share_table(ref, cur)})


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
        # under no change: E0 = 0.8687 s, q0 = c(alpha) s, s = sqrt((n1 + n2) / (n1 n2))
        scale = np.sqrt((len(rp) + len(cp)) / (len(rp) * len(cp)))
        expected = KS_MEAN * scale
        critical = np.sqrt(-np.log(opts.alpha / 2) / 2) * scale if opts.alpha < 1 else 0.0
        out.append(DriftMetric.decide(
            "price_ks", "ks", float(ks.statistic), opts.ks_threshold,
            noise_margin(expected, critical, opts.ks_threshold, opts.alpha),
            details={"p_value": float(ks.pvalue), "alpha": opts.alpha, "n_reference": len(rp), "n_current": len(cp),
                     "expected": _r(expected, 6), "critical": _r(critical, 6),
                     "reference_median": float(np.median(rp)), "current_median": float(np.median(cp))}))
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


@dataclass
class FeedbackCounts:
    """What feedback drift compares, as counts: small whatever the day's size, so an engine
    (pandas :func:`feedback_counts`, Spark ``spark_engine.feedback_counts_spark``) computes them
    and :func:`feedback_drift` never needs the events themselves."""

    rows: int
    event_types: dict  # event_type -> events
    searches: dict  # query -> requests (the query of each request's first event)
    click_positions: dict  # position -> clicks
    position_events: dict  # position (1..ctr_positions) -> {"impression": n, "click": n}


def feedback_counts(df: pd.DataFrame, positions: int) -> FeedbackCounts:
    searches = df.drop_duplicates("request_id")["query"] if "request_id" in df.columns else df["query"]
    clicks = df[df["event_type"] == "click"]
    top = df[df["position"].between(1, positions) & df["event_type"].isin(["impression", "click"])]
    table: dict[int, dict[str, int]] = {}
    for (p, e), n in top.groupby(["position", "event_type"]).size().items():
        table.setdefault(int(p), {})[str(e)] = int(n)
    click_pos = pd.to_numeric(clicks["position"], errors="coerce")
    return FeedbackCounts(
        rows=len(df), event_types={k: int(v) for k, v in df["event_type"].value_counts().items()},
        searches={(None if pd.isna(k) else k): int(v) for k, v in searches.value_counts(dropna=False).items()},
        click_positions={(None if pd.isna(k) else int(k)): int(v)
                         for k, v in click_pos.value_counts(dropna=False).items()},
        position_events=table)


def _series(counts: dict) -> pd.Series:
    """Counts as a Series in one canonical order (so both engines tie-break alike)."""
    keys = sorted(counts, key=lambda k: (k is None, str(k)))
    return pd.Series([counts[k] for k in keys], index=pd.Index([np.nan if k is None else k for k in keys],
                                                               dtype=object), dtype="int64")


def feedback_drift(cur: "pd.DataFrame | FeedbackCounts", ref: "pd.DataFrame | FeedbackCounts",
                   opts: DriftOptions) -> list[DriftMetric]:
    if isinstance(cur, pd.DataFrame):
        cur = feedback_counts(cur, opts.ctr_positions)
    if isinstance(ref, pd.DataFrame):
        ref = feedback_counts(ref, opts.ctr_positions)
    out: list[DriftMetric] = []
    if min(ref.rows, cur.rows) < opts.min_rows:
        why = f"fewer than {opts.min_rows} events on one of the days ({ref.rows} vs {cur.rows})"
        return [_not_evaluated(n, m, t, why) for n, m, t in (
            ("event_type_mix_psi", "psi", opts.psi_threshold), ("query_mix_psi", "psi", opts.psi_threshold),
            ("click_position_psi", "psi", opts.psi_threshold), ("ctr_by_position", "max_abs_diff", opts.ctr_abs_threshold))]
    types = pd.Index(list(EVENT_TYPES))

    def type_counts(fc: FeedbackCounts) -> pd.Series:
        known = {k: fc.event_types[k] for k in sorted(k for k in fc.event_types if k is not None)}  # canonical
        return pd.Series(known, dtype="int64").reindex(types.union(pd.Index(list(known))), fill_value=0)

    out.append(_psi_metric("event_type_mix_psi", type_counts(ref), type_counts(cur), opts))
    r, c = _top_k_of_counts(_series(ref.searches), _series(cur.searches), opts.top_k, opts.min_share)
    out.append(_psi_metric("query_mix_psi", r, c, opts))

    n = opts.ctr_positions

    def buckets(fc: FeedbackCounts) -> pd.Series:
        pos = pd.Series(list(fc.click_positions), dtype="float64")
        labels = _position_bucket(pos, n) if len(pos) else pd.Series([], dtype=object)
        return pd.Series(list(fc.click_positions.values()), index=labels.to_numpy(), dtype="int64").groupby(
            level=0).sum().sort_values(ascending=False, kind="stable")

    rclicks, cclicks = sum(ref.click_positions.values()), sum(cur.click_positions.values())
    if min(rclicks, cclicks) < max(10, opts.min_rows // 10):
        out.append(_not_evaluated("click_position_psi", "psi", opts.psi_threshold,
                                  f"too few clicks ({rclicks} vs {cclicks})"))
    else:
        out.append(_psi_metric("click_position_psi", buckets(ref), buckets(cur), opts))

    def ctr(fc: FeedbackCounts) -> pd.DataFrame:
        t = pd.DataFrame({"impression": [fc.position_events.get(p, {}).get("impression", 0) for p in range(1, n + 1)],
                          "click": [fc.position_events.get(p, {}).get("click", 0) for p in range(1, n + 1)]},
                         index=pd.RangeIndex(1, n + 1, name="position"), dtype="int64")
        t["ctr"] = t["click"] / t["impression"].where(t["impression"] > 0)
        return t

    rt, ct = ctr(ref), ctr(cur)
    ok = (rt["impression"] >= opts.min_impressions_per_position) & (ct["impression"] >= opts.min_impressions_per_position)
    # per position, under no change d ~ N(0, se^2) (two-proportion z-test, pooled CTR):
    # E0 = sqrt(2/pi) se, q0 = z(1 - alpha/2m) se; drifts when |d| > threshold + max(E0, q0 - threshold)
    from scipy.stats import norm

    n1, n2 = rt["impression"].where(rt["impression"] > 0), ct["impression"].where(ct["impression"] > 0)
    diff = ct["ctr"] - rt["ctr"]
    pooled = (rt["click"] + ct["click"]) / (n1 + n2)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    tested = max(int(ok.sum()), 1)  # Bonferroni: alpha is for the metric, not for each position
    z = float(norm.ppf(1 - opts.alpha / (2 * tested))) if opts.alpha < 1 else 0.0
    thr = opts.ctr_abs_threshold
    margin = pd.Series([noise_margin(np.sqrt(2 / np.pi) * e, z * e, thr, opts.alpha) if pd.notna(e) else np.nan
                        for e in se], index=diff.index)
    p_value = pd.Series(2 * norm.sf(np.abs(diff / se.where(se > 0))), index=diff.index)
    table = {int(p): {"reference_ctr": _r(rt.at[p, "ctr"]), "current_ctr": _r(ct.at[p, "ctr"]),
                      "reference_impressions": int(rt.at[p, "impression"]),
                      "current_impressions": int(ct.at[p, "impression"]), "abs_diff": _r(abs(diff.at[p])),
                      "noise": _r(margin.at[p]), "p_value": _r(p_value.at[p], 8)}
             for p in rt.index}
    if not ok.any():
        out.append(_not_evaluated("ctr_by_position", "max_abs_diff", thr,
                                  f"no position has {opts.min_impressions_per_position} impressions on both days"))
    else:
        absdiff = diff.abs()[ok]
        beyond = (absdiff - margin[ok]).fillna(-np.inf)  # change beyond its sampling noise
        worst = int(absdiff.idxmax())
        value = float(absdiff.max())
        best = float(beyond.max())
        flagged = [int(p) for p in beyond.index if beyond[p] > thr]
        metric = DriftMetric.decide("ctr_by_position", "max_abs_diff", value, thr,
                                    value - best if np.isfinite(best) else float("inf"),
                                    details={"worst_position": worst, "drifted_positions": flagged,
                                             "alpha": opts.alpha, "positions_tested": tested,
                                             "largest_change_beyond_noise": _r(best, 6),
                                             "by_position": table})
        metric.drifted = bool(flagged)  # the same comparison per position (value - noise == best)
        out.append(metric)
    return out


def _r(v: Any, digits: int = 5) -> float | None:
    return None if v is None or pd.isna(v) else round(float(v), digits)


def _rows(data: "pd.DataFrame | FeedbackCounts") -> int:
    return data.rows if isinstance(data, FeedbackCounts) else len(data)


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
                         mode=opts.mode, status="no_reference", rows=_rows(current),
                         reference_rows=0 if reference is None else _rows(reference), run_id=run_id)
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
            frames.append(storage.read_parquet(key, columns=columns))
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
