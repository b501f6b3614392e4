"""Online metrics per A/B arm, computed from FEEDBACK-contract events.

:func:`online_metrics_by_arm` is a pure function of one or more days of events (the daily
update logs its output on the daily MLflow run as ``online_<arm>_<metric>``).  Per arm:

* ``requests``: distinct ``request_id`` with at least one impression;
* ``impressions``, ``clicks``: counted once per (request, product) (retries and double
  clicks collapse; events are first deduplicated by ``event_id``);
* ``ctr``: clicks / impressions;
* ``click_rate``, ``add_to_cart_rate``, ``purchase_rate``: share of requests with at least
  one click / add-to-cart / purchase;
* ``mrr``: mean over requests of 1 / (best position clicked), 0 for requests without clicks.

Events without an ``arm`` column or with a null arm count as ``champion`` (everything served
before A/B testing, or in ``champion`` mode, came from the champion).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

METRICS = ("requests", "impressions", "clicks", "ctr", "click_rate", "add_to_cart_rate", "purchase_rate", "mrr")
DEFAULT_ARM = "champion"


def _arm_key(arm: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", str(arm)) or DEFAULT_ARM


def online_metrics_by_arm(events: pd.DataFrame) -> dict[str, float]:
    """``{"online_<arm>_<metric>": value}`` for every arm present in ``events``."""
    if events is None or len(events) == 0:
        return {}
    need = {"request_id", "product_id", "event_type", "position"}
    missing = sorted(need - set(events.columns))
    if missing:
        raise ValueError(f"online metrics need feedback columns {sorted(need)}; missing {missing}")
    df = events
    if "event_id" in df.columns:
        df = df.drop_duplicates("event_id")
    arm = df["arm"] if "arm" in df.columns else pd.Series(DEFAULT_ARM, index=df.index)
    df = df.assign(_arm=arm.astype("object").where(arm.notna(), DEFAULT_ARM).map(_arm_key),
                   _pos=pd.to_numeric(df["position"], errors="coerce"))
    # one arm per request: the first one logged (a request is served by exactly one arm)
    req_arm = df.drop_duplicates("request_id").set_index("request_id")["_arm"]
    df["_arm"] = df["request_id"].map(req_arm)
    out: dict[str, float] = {}
    for name, g in df.groupby("_arm", sort=True):
        signal = g.drop_duplicates(["request_id", "product_id", "event_type"])
        imps = signal[signal["event_type"] == "impression"]
        requests = imps["request_id"].nunique()
        if requests == 0:
            continue
        clicks = signal[signal["event_type"] == "click"]
        with_type = {t: signal.loc[signal["event_type"] == t, "request_id"].nunique()
                     for t in ("click", "add_to_cart", "purchase")}
        best = clicks.groupby("request_id")["_pos"].min()
        rr = (1.0 / best.clip(lower=1)).reindex(imps["request_id"].unique(), fill_value=0.0)
        values = {
            "requests": float(requests),
            "impressions": float(len(imps)),
            "clicks": float(len(clicks)),
            "ctr": float(len(clicks) / len(imps)),
            "click_rate": with_type["click"] / requests,
            "add_to_cart_rate": with_type["add_to_cart"] / requests,
            "purchase_rate": with_type["purchase"] / requests,
            "mrr": float(np.nan_to_num(rr.to_numpy(dtype=float)).mean()),
        }
        out.update({f"online_{name}_{k}": float(v) for k, v in values.items()})
    return out
