"""Promotion policy: the gate that decides whether a challenger may be shown to a person,
the approval card that person reads, and the optional auto-promotion rule.

Inputs are a model version's evidence (``Registry.evidence``: the metrics its evaluation
logged on the version's run, the run's params and ``train.*`` tags, and the version's own
tags), so the decision is reproducible from MLflow alone.  Names (identical across runs):

* ``ndcg_at_10``, ``mrr_at_10``, ``recall_at_<k>``: the challenger on the test split, and
  ``bm25_<metric>`` / ``champion_<metric>`` for the baselines on the same candidates;
* ``delta_ndcg_at_10_vs_<baseline>`` with ``..._lo`` / ``..._hi``: paired bootstrap 95% CI
  of the per-query difference challenger - baseline (baselines: ``bm25``, ``champion``);
* ``delta_ndcg_at_10_vs_<baseline>_<slice>`` (+ ``_lo``/``_hi``) and ``<slice>_ndcg_at_10``
  per slice, e.g. ``<slice>`` = ``query_freq_bucket_tail`` (see shoprank.evaluation.report);
* ``n_queries``: test queries with a relevant product (the evidence the deltas rest on);
* ``validation_status`` (a version tag): ``passed`` when every validate task of the run
  succeeded (written by ``register`` from the validate tasks' results);
* ``champion_compared`` (a version tag): the champion version the evaluation compared with,
  or ``none`` (from ``evaluate``: "no champion yet" is a recorded fact, never a missing value);
* ``latency_ms_per_request`` (median ms for one request of ``latency_candidates`` products),
  ``champion_latency_ms_per_request`` and ``latency_ratio_vs_champion``: the packaged models
  timed side by side in one run (``shoprank.evaluation.latency``).

**Every check fails closed**: a missing, empty or NaN value fails its check with a reason
that names it; nothing defaults to "passed".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class GatePolicy:
    """Configurable rules (env: SHOPRANK_GATE_*; see README "Promotion gate").

    Latency budgets from a production SLO: if ``/rank`` must answer within ``S`` ms at p50 for
    requests of ``N`` candidates, set ``SHOPRANK_GATE_LATENCY_CANDIDATES=N`` and
    ``SHOPRANK_GATE_MAX_LATENCY_MS`` to ``S`` times the speed-up the serving backend gives
    over the packaged model on the serving hardware (``shoprank export`` reports it: int8 ONNX
    is 1.7-2.7x eager on the 2-core machines of bench/README.md), measured on hardware like
    the training worker's, or leave it generous and rely on the ratio, which compares the
    challenger with the champion on the same machine in the same minute.
    """

    must_beat_bm25: bool = True  # lower CI bound of delta vs BM25 must be > 0
    max_regression_vs_champion: float = 0.01  # lower CI bound of delta vs champion >= -this
    min_test_queries: int = 100  # test queries with a relevant product; fewer = insufficient evidence
    latency_candidates: int = 50  # products per timed ranking request
    max_latency_ms: float = 4000.0  # median ms per request (packaged model, CPU); generous on purpose
    max_latency_ratio: float = 1.25  # challenger / champion, timed side by side in one run
    auto_promote: bool = False  # daily update: promote without a person when the rule below holds
    auto_promote_min_gain: float = 0.0  # lower CI bound of delta vs champion must exceed this
    auto_promote_max_slice_regression: float = 0.02  # no slice's delta vs champion below -this

    @classmethod
    def from_env(cls, settings=None) -> "GatePolicy":
        """The policy of the settings tree's ``gate`` group (``SHOPRANK_GATE_*``, ``SHOPRANK_AUTO_PROMOTE*``)."""
        from shoprank.config import get_settings

        g = (settings or get_settings()).gate
        return cls(must_beat_bm25=g.must_beat_bm25, max_regression_vs_champion=g.max_regression,
                   min_test_queries=g.min_test_queries, latency_candidates=g.latency_candidates,
                   max_latency_ms=g.max_latency_ms, max_latency_ratio=g.max_latency_ratio,
                   auto_promote=g.auto_promote, auto_promote_min_gain=g.auto_promote_min_gain,
                   auto_promote_max_slice_regression=g.auto_promote_max_slice_regression)


@dataclass
class GateDecision:
    eligible: bool
    reasons: list[str] = field(default_factory=list)  # why not eligible
    checks: dict[str, str] = field(default_factory=dict)  # check -> "pass: ..." / "fail: ..."
    auto_promote: bool = False

    def as_tags(self) -> dict[str, str]:
        tags = {"gate_eligible": str(self.eligible).lower(), "gate_auto_promote": str(self.auto_promote).lower()}
        tags["gate_reasons"] = "; ".join(self.reasons) if self.reasons else "all checks passed"
        for name, outcome in self.checks.items():
            tags[f"gate.{name}"] = outcome
        return tags


def _f(tags: Mapping[str, str], key: str) -> float | None:
    value = tags.get(key)
    if value in (None, "", "nan", "None"):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def evaluate_gate(tags: Mapping[str, str], policy: GatePolicy) -> GateDecision:
    """Every check reads a value the run wrote; a missing or NaN one fails (see module docstring)."""
    d = GateDecision(eligible=True)

    def check(name: str, ok: bool, detail: str) -> None:
        d.checks[name] = ("pass: " if ok else "fail: ") + detail
        if not ok:
            d.eligible = False
            d.reasons.append(f"{name}: {detail}")

    status = tags.get("validation_status")
    if status in (None, ""):
        check("data_validation", False, "no validation status recorded for the training data (missing value)")
    else:
        check("data_validation", status == "passed", f"training data validation status is {status!r}")

    n_queries = _f(tags, "n_queries")
    if n_queries is None:
        check("enough_evidence", False, "the number of test queries was not recorded (missing value)")
    else:
        check("enough_evidence", n_queries >= policy.min_test_queries,
              f"{n_queries:.0f} test queries with a relevant product (needs >= {policy.min_test_queries}; "
              "fewer is insufficient evidence: judge more queries or raise the test fraction)")

    lo = _f(tags, "delta_ndcg_at_10_vs_bm25_lo")
    if policy.must_beat_bm25:
        if lo is None:
            check("beats_bm25", False, "no BM25 comparison in the evaluation (missing or NaN value)")
        else:
            check("beats_bm25", lo > 0, f"NDCG@10 delta vs BM25 95% CI lower bound {lo:+.4f} (needs > 0)")

    compared = tags.get("champion_compared")
    champ_lo = _f(tags, "delta_ndcg_at_10_vs_champion_lo")
    if compared in (None, ""):
        check("no_regression_vs_champion", False,
              "the evaluation did not record whether a champion was compared (missing value)")
    elif compared == "none":
        d.checks["no_regression_vs_champion"] = "pass: no champion yet (recorded by the evaluation)"
    elif champ_lo is None:
        check("no_regression_vs_champion", False,
              f"champion version {compared} was compared but its NDCG@10 delta is missing or NaN")
    else:
        tol = policy.max_regression_vs_champion
        check("no_regression_vs_champion", champ_lo >= -tol,
              f"NDCG@10 delta vs champion v{compared} 95% CI lower bound {champ_lo:+.4f} (needs >= {-tol:+.4f})")

    latency = _f(tags, "latency_ms_per_request")
    n_cand = tags.get("latency_candidates", "?")
    if latency is None:
        check("serving_latency", False, "the packaged model was not timed (latency_ms_per_request missing)")
    else:
        detail = f"{latency:.0f} ms per request of {n_cand} candidates (budget {policy.max_latency_ms:.0f} ms)"
        ok = latency <= policy.max_latency_ms
        if compared not in (None, "", "none"):
            ratio = _f(tags, "latency_ratio_vs_champion")
            if ratio is None:
                ok, detail = False, detail + "; ratio vs the champion missing or NaN"
            else:
                ok = ok and ratio <= policy.max_latency_ratio
                detail += (f"; {ratio:.2f}x the champion timed side by side "
                           f"(budget {policy.max_latency_ratio:.2f}x)")
        check("serving_latency", ok, detail)

    if d.eligible and policy.auto_promote and champ_lo is not None:
        deltas = [_f(tags, f"delta_ndcg_at_10_vs_champion_{s}") for s in slice_names(tags, "champion")]
        worst_slice = min((v for v in deltas if v is not None), default=0.0)
        d.auto_promote = (champ_lo > policy.auto_promote_min_gain
                          and worst_slice >= -policy.auto_promote_max_slice_regression)
        d.checks["auto_promote"] = (
            f"{'yes' if d.auto_promote else 'no'}: CI lower bound vs champion {champ_lo:+.4f} "
            f"(needs > {policy.auto_promote_min_gain:+.4f}), worst slice delta {worst_slice:+.4f} "
            f"(needs >= {-policy.auto_promote_max_slice_regression:+.4f})")
    return d


def slice_names(tags: Mapping[str, str], baseline: str) -> list[str]:
    """Slices with a delta vs ``baseline`` in the tags, e.g. ``query_freq_bucket_tail``."""
    prefix = f"delta_ndcg_at_10_vs_{baseline}_"
    names = {k[len(prefix):] for k in tags if k.startswith(prefix)}
    return sorted(n for n in names if n not in ("lo", "hi") and not n.endswith(("_lo", "_hi")))


def _fmt(tags: Mapping[str, str], key: str) -> str:
    v = _f(tags, key)
    return "n/a" if v is None else f"{v:.4f}"


def _ci(tags: Mapping[str, str], key: str) -> str:
    v, lo, hi = _f(tags, key), _f(tags, key + "_lo"), _f(tags, key + "_hi")
    if v is None:
        return "n/a"
    if lo is None or hi is None:
        return f"{v:+.4f}"
    return f"{v:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _training_line(tags: Mapping[str, str]) -> str:
    """What the run really did: steps run vs the cap, passes over the data, pairs seen."""
    steps, cap = tags.get("train.global_step"), tags.get("train.max_steps")
    if steps is None:
        return "n/a (no training summary recorded)"
    cap_text = "no step cap" if cap in (None, "", "-1") else f"cap {cap}"
    parts = [f"{steps} optimizer steps ({cap_text}, epoch budget {tags.get('param.epochs', 'n/a')})"]
    if tags.get("train.epochs_run"):
        parts.append(f"{float(tags['train.epochs_run']):.2f} epochs of {tags.get('train.steps_per_epoch', '?')} steps")
    if tags.get("train.train_pairs"):
        parts.append(f"{int(float(tags['train.train_pairs'])):,} training pairs seen")
    if tags.get("train.stopped_early") == "True":
        parts.append("stopped early")
    return ", ".join(parts)


def approval_card(version: str, tags: Mapping[str, str], champion_version: str | None,
                  links: Mapping[str, str]) -> str:
    """Markdown body of the approval step (Airflow renders it in *Required Actions*)."""
    lines = [
        f"### Promote version {version} to `champion`?",
        "",
        f"Current champion: **{'version ' + champion_version if champion_version else 'none (first model)'}**  ",
        f"Data snapshot: `{tags.get('data_snapshot', 'n/a')}`  ",
        f"Training: base `{tags.get('param.base_model', 'n/a')}`, loss `{tags.get('param.loss', 'n/a')}`, "
        f"lr {tags.get('param.lr', 'n/a')}, max length {tags.get('param.max_length', 'n/a')}  ",
        f"Trained: {_training_line(tags)}  ",
        f"Ranking score: {tags.get('train.fusion', 'n/a')} ({tags.get('train.fusion_reason', 'n/a')})",
        "",
        "| metric (test split) | challenger | BM25 | champion |",
        "|---|---|---|---|",
    ]
    for m in ("ndcg_at_10", "ndcg_exp_at_10", "mrr_at_10", "recall_at_20"):
        lines.append(f"| {m} | {_fmt(tags, m)} | {_fmt(tags, 'bm25_' + m)} | {_fmt(tags, 'champion_' + m)} |")
    lines += [
        "",
        "Paired bootstrap 95% CI of the NDCG@10 difference (challenger - baseline):",
        "",
        f"- vs BM25: {_ci(tags, 'delta_ndcg_at_10_vs_bm25')}",
        f"- vs champion: {_ci(tags, 'delta_ndcg_at_10_vs_champion')}",
        "",
    ]
    slices = sorted(set(slice_names(tags, "bm25")) | set(slice_names(tags, "champion")))
    if slices:
        lines += ["| slice | NDCG@10 | delta vs BM25 [95% CI] | delta vs champion [95% CI] |", "|---|---|---|---|"]
        for s in slices:
            lines.append(f"| {s} | {_fmt(tags, f'{s}_ndcg_at_10')} | {_ci(tags, f'delta_ndcg_at_10_vs_bm25_{s}')} | "
                         f"{_ci(tags, f'delta_ndcg_at_10_vs_champion_{s}')} |")
        lines.append("")
    lines.append("Gate: " + tags.get("gate_reasons", "n/a"))
    if links:
        lines += ["", " · ".join(f"[{name}]({url})" for name, url in links.items())]
    return "\n".join(lines)
