"""Dataset snapshots: validated raw data -> train/val/test splits in ``datasets/<snapshot>/``.

Rules (documented in the README):

* Splits are **by query**, never by row: a query and all its judged products land in one
  split, decided by a seeded hash of the query text, so the split of a query never changes
  when more data arrives.
* The test split gets, per query, its judged products plus ``n_negatives`` products sampled
  from the catalogue (fixed seed) with grade 0: the candidates a search engine would return
  are never only the judged ones.
* Slices: ``query_freq_bucket`` (head = queries making up the first 50% of search traffic,
  torso = the next 30%, tail = the rest, from the ``queries`` dataset) and ``category``.
* The snapshot id is a hash of the source partitions' content and the parameters: the same
  inputs give the same snapshot (idempotent per logical date); ``manifest.json`` lists row
  counts, source partitions and their hashes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from shoprank.data.contracts import product_text
from shoprank.storage import Storage, StorageError, dataset_prefix

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SNAPSHOT_COLUMNS = ["query", "product_id", "text", "grade", "weight", "query_freq_bucket", "category"]


@dataclass(frozen=True)
class SnapshotParams:
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    n_negatives: int = 20
    seed: int = 42
    zone: str = "validated"

    def __post_init__(self) -> None:
        if not (0 <= self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")


@dataclass
class Manifest:
    snapshot: str
    created_at: str
    params: dict
    sources: dict = field(default_factory=dict)  # dataset -> {date, files: {key: sha256}}
    rows: dict = field(default_factory=dict)  # split -> rows
    queries: dict = field(default_factory=dict)  # split -> distinct queries

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def split_of(query: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split for a query (stable across runs and data growth)."""
    h = int(hashlib.sha256(f"{seed}:{query}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if h < test_fraction:
        return "test"
    if h < test_fraction + val_fraction:
        return "val"
    return "train"


def frequency_buckets(queries: pd.DataFrame) -> pd.Series:
    """head / torso / tail per query from its share of search traffic."""
    q = queries.sort_values(["frequency", "query"], ascending=[False, True])
    # share of traffic from strictly more frequent queries (integer sums: no float drift)
    before = (q["frequency"].cumsum() - q["frequency"]) / max(int(q["frequency"].sum()), 1)
    bucket = np.where(before < 0.5, "head", np.where(before < 0.8, "torso", "tail"))
    return pd.Series(bucket, index=q["query"].values, name="query_freq_bucket")


def build_splits(catalog: pd.DataFrame, judgments: pd.DataFrame, queries: pd.DataFrame | None,
                 params: SnapshotParams) -> dict[str, pd.DataFrame]:
    """Pure function: frames in, split frames out (see module docstring for the rules)."""
    products = catalog.drop_duplicates("product_id").set_index("product_id")
    texts = product_text(products.reset_index()).set_axis(products.index)
    known = judgments[judgments["product_id"].isin(products.index)].copy()
    dropped = len(judgments) - len(known)
    if dropped:
        log.warning("%d judgments refer to products missing from the catalogue; left out", dropped)
    known = known.drop_duplicates(["query", "product_id"], keep="last")
    known["text"] = texts.reindex(known["product_id"]).values
    known["grade"] = known["grade"].astype("int64")
    known["weight"] = 1.0
    if queries is not None and len(queries):
        buckets = frequency_buckets(queries)
        qcat = queries.drop_duplicates("query").set_index("query")["category"]
    else:
        buckets = pd.Series(dtype="string")
        qcat = pd.Series(dtype="string")
    known["query_freq_bucket"] = buckets.reindex(known["query"]).fillna("tail").values
    # the query's category, else the category of its best-graded product
    best_cat = (known.sort_values(["grade", "product_id"], ascending=[False, True], kind="stable").drop_duplicates("query")
                .set_index("query")["product_id"].map(products["category"]))
    cat = qcat.reindex(known["query"]).astype("object")
    cat = cat.where(cat.notna(), best_cat.reindex(known["query"]).values)
    known["category"] = cat.fillna("unknown").astype(str).str.split(" > ").str[0].values
    known["split"] = [split_of(q, params.seed, params.val_fraction, params.test_fraction) for q in known["query"]]

    out: dict[str, pd.DataFrame] = {}
    for split in SPLITS:
        part = known[known["split"] == split]
        if split == "test" and len(part) and params.n_negatives > 0:
            part = pd.concat([part, _sampled_negatives(part, products, texts, params)], ignore_index=True)
        out[split] = (part[SNAPSHOT_COLUMNS].sort_values(["query", "product_id"]).reset_index(drop=True)
                      .astype({"query": "string", "product_id": "string", "text": "string",
                               "query_freq_bucket": "string", "category": "string"}))
    return out


def _sampled_negatives(test: pd.DataFrame, products: pd.DataFrame, texts: pd.Series,
                       params: SnapshotParams) -> pd.DataFrame:
    rng = np.random.default_rng(params.seed)
    ids = products.index.to_numpy()
    rows = []
    for query, group in test.groupby("query", sort=True):
        judged = set(group["product_id"])
        pick = rng.choice(ids, size=min(len(ids), params.n_negatives + len(judged)), replace=False)
        pick = [p for p in pick if p not in judged][: params.n_negatives]
        first = group.iloc[0]
        for pid in pick:
            rows.append((query, pid, texts[pid], 0, 1.0, first["query_freq_bucket"], first["category"]))
    return pd.DataFrame(rows, columns=SNAPSHOT_COLUMNS)


def _latest(storage: Storage, zone: str, dataset: str, day: str | None) -> str:
    latest = storage.latest_partition(zone, dataset, day)
    if latest is None:
        raise StorageError(
            f"no {zone} partition of {dataset!r} in s3://{storage.bucket}/{zone}/{dataset}/"
            + (f" on or before {day}" if day else "")
            + ": run validation first (shoprank validate / the train DAG's validate tasks)"
        )
    return latest


def build_snapshot(storage: Storage, params: SnapshotParams = SnapshotParams(), day: str | dt.date | None = None,
                   snapshot: str | None = None) -> Manifest:
    """Read the latest partitions (on or before ``day``), write the splits and manifest."""
    day = day.isoformat() if isinstance(day, dt.date) else day
    frames, sources = {}, {}
    for dataset in ("catalog", "judgments", "queries"):
        try:
            latest = _latest(storage, params.zone, dataset, day)
        except StorageError:
            if dataset == "queries":
                frames[dataset] = None  # optional: slices fall back to "tail"
                continue
            raise
        files = storage.partition_files(params.zone, dataset, latest)
        sources[dataset] = {"date": latest,
                            "files": {k: hashlib.sha256(storage.get_bytes(k)).hexdigest() for k in files}}
        frames[dataset] = storage.read_partition(params.zone, dataset, latest)
    fingerprint = hashlib.sha256(json.dumps([sources, asdict(params)], sort_keys=True).encode()).hexdigest()[:10]
    snapshot = snapshot or f"{sources['judgments']['date']}-{fingerprint}"
    prefix = dataset_prefix(snapshot)
    if storage.exists(prefix + "manifest.json"):
        log.info("snapshot %s already exists (same inputs and parameters); reusing it", snapshot)
        return Manifest(**json.loads(storage.get_bytes(prefix + "manifest.json")))
    splits = build_splits(frames["catalog"], frames["judgments"], frames["queries"], params)
    manifest = Manifest(snapshot=snapshot, created_at=dt.datetime.now(dt.timezone.utc).isoformat(),
                        params=asdict(params), sources=sources)
    for split, df in splits.items():
        storage.write_parquet(df, f"{prefix}{split}.parquet")
        manifest.rows[split] = int(len(df))
        manifest.queries[split] = int(df["query"].nunique())
        log.info("snapshot %s: %s = %d rows, %d queries", snapshot, split, len(df), df["query"].nunique())
    if not manifest.rows["train"] or not manifest.rows["test"]:
        raise ValueError(f"snapshot {snapshot} has an empty split: {manifest.rows}; add more judged queries")
    storage.put_bytes(prefix + "manifest.json", manifest.to_json().encode(), "application/json")  # last: marks complete
    return manifest


def load_split(storage: Storage, snapshot: str, split: str) -> pd.DataFrame:
    return storage.read_parquet(f"{dataset_prefix(snapshot)}{split}.parquet")


def latest_snapshot(storage: Storage) -> str:
    keys = [k for k in storage.list_keys("datasets/") if k.endswith("/manifest.json")]
    if not keys:
        raise StorageError("no dataset snapshot in datasets/: build one first (train DAG / shoprank snapshot)")
    manifests = [json.loads(storage.get_bytes(k)) for k in keys]
    return max(manifests, key=lambda m: m["created_at"])["snapshot"]
