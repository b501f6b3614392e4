"""Thresholds and switches of the validation step, all configurable.

Defaults suit the synthetic marketplace and a real shop of modest size.  Change them in
three ways (later wins): ``ValidationOptions()`` keyword arguments in code, environment
variables ``SHOPRANK_VALIDATION_<FIELD>`` / ``SHOPRANK_DRIFT_<FIELD>`` (see
:meth:`ValidationOptions.from_env`), or a mapping such as a DAG run's ``conf``
(:meth:`ValidationOptions.from_mapping`, keys ``row_count_min_ratio`` or ``drift.mode``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

DRIFT_MODES = ("warn", "block", "off")


@dataclass(frozen=True)
class DriftOptions:
    """Day-over-day drift thresholds (feedback and catalogue)."""

    mode: str = "warn"  # warn: log + report; block: raise DriftDetected; off: skip
    psi_threshold: float = 0.2  # population stability index; 0.1 moderate, 0.25 major shift
    ks_threshold: float = 0.1  # two-sample Kolmogorov-Smirnov statistic (max CDF gap)
    ctr_abs_threshold: float = 0.05  # largest tolerated change of CTR at a position (absolute)
    ctr_positions: int = 10  # CTR by position is compared for positions 1..N
    top_k: int = 50  # categories / queries beyond the K most frequent are pooled as "(other)"
    min_share: float = 0.01  # ... and so are those under this share of the two days pooled (PSI is noisy on rare bins)
    alpha: float = 0.001  # a drift counts only beyond sampling error at this level (every measure; see drift.py)
    min_rows: int = 200  # fewer rows on either day: metric reported as not evaluated
    min_impressions_per_position: int = 50  # CTR at a position needs this many impressions

    def __post_init__(self) -> None:
        if self.mode not in DRIFT_MODES:
            raise ValueError(f"drift mode {self.mode!r} is not one of {DRIFT_MODES}")


@dataclass(frozen=True)
class ValidationOptions:
    """Everything a validation run can be tuned with.  Fractions are of rows."""

    # row-count sanity vs the previous validated partition of the same dataset
    row_count_min_ratio: float = 0.2
    row_count_max_ratio: float = 5.0
    # referential integrity: share of rows whose product_id is not in the catalogue
    unknown_product_tolerance: float = 0.01
    require_catalog: bool = False  # True: fail when no validated catalogue exists yet
    # feedback: duplicates (same event_id, or same event content under another id)
    duplicate_event_tolerance: float = 0.01
    # feedback: bot signal.  A session is implausible when it has more clicks than
    # impressions, or at least `bot_min_impressions` impressions and a click rate above
    # `max_session_click_rate` (people rarely click 3 of 4 results over 20+ results; the
    # synthetic simulator's bots click ~85%, its shoppers at most ~60%).
    # `bot_session_tolerance` is the share of sessions that may look like that: the labels
    # step filters a few bots anyway; a flood is a data problem and quarantines the day.
    max_session_click_rate: float = 0.75
    bot_min_impressions: int = 20
    bot_session_tolerance: float = 0.05
    max_position: int = 1000
    # timestamps: "not in the future" allows this much clock skew
    clock_skew_seconds: int = 300
    # reading: a single string cell longer than this makes the file malformed
    max_field_chars: int = 100_000
    # reporting
    max_examples: int = 5  # example bad rows per failing expectation in messages
    build_docs: bool = True  # build GX Data Docs and upload them to reports/data-docs/
    docs_history: int = 200  # validation results kept on the Data Docs index
    # fixed "now" for reproducible runs/tests; None means the wall clock
    now: dt.datetime | None = None
    drift: DriftOptions = field(default_factory=DriftOptions)

    def __post_init__(self) -> None:
        for name in ("unknown_product_tolerance", "duplicate_event_tolerance", "bot_session_tolerance"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r}: a tolerated fraction is between 0 and 1")
        if not 0 <= self.row_count_min_ratio <= self.row_count_max_ratio:
            raise ValueError(
                f"row_count_min_ratio={self.row_count_min_ratio} / row_count_max_ratio="
                f"{self.row_count_max_ratio}: need 0 <= min <= max"
            )
        if self.now is not None and self.now.tzinfo is None:
            raise ValueError("now must be timezone-aware (UTC)")

    # ---- construction from outside --------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: "ValidationOptions | None" = None) -> "ValidationOptions":
        """Options from a flat mapping (DAG conf, CLI flags); ``drift.<field>`` keys set drift options."""
        base = base or cls()
        own = {f.name: f for f in fields(cls)}
        drift_fields = {f.name: f for f in fields(DriftOptions)}
        top: dict[str, Any] = {}
        drift: dict[str, Any] = {}
        for key, raw in values.items():
            if key.startswith("drift.") or key.startswith("drift_"):
                name = key.split(".", 1)[1] if key.startswith("drift.") else key[len("drift_") :]
                if name not in drift_fields:
                    raise ValueError(f"unknown drift option {key!r}; known: {sorted(drift_fields)}")
                drift[name] = _coerce(key, raw, getattr(base.drift, name))
            elif key in own and key != "drift":
                top[key] = _coerce(key, raw, getattr(base, key))
            else:
                raise ValueError(f"unknown validation option {key!r}; known: {sorted(k for k in own if k != 'drift')}")
        if drift:
            top["drift"] = replace(base.drift, **drift)
        return replace(base, **top)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ValidationOptions":
        """Defaults overridden by the settings tree's ``validation`` group
        (``SHOPRANK_VALIDATION_<FIELD>``, ``SHOPRANK_DRIFT_<FIELD>``)."""
        from shoprank.config import Settings

        return cls.from_mapping(Settings.from_env(environ).validation.overrides())

    def public_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("drift", "now")}
        out["now"] = self.now.isoformat() if self.now else None
        out["drift"] = {f.name: getattr(self.drift, f.name) for f in fields(self.drift)}
        return out


def _coerce(key: str, raw: Any, current: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        if isinstance(current, bool):
            if raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if raw.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if key.endswith("now"):
            value = dt.datetime.fromisoformat(raw)
            return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    except ValueError:
        raise ValueError(f"validation option {key}={raw!r} is not a valid {type(current).__name__}") from None
    return raw
