"""Data side of training: snapshot frames -> tokenised (query, product) pairs -> batches.

Input frames (one per split) have the columns ``query``, ``product_id``, ``text`` (from
:func:`shoprank.data.contracts.product_text`), ``grade`` (0..3) and optionally ``weight``
(default 1.0) plus slice columns, which training ignores.

* Pairs are tokenised once, up front, with the model's tokenizer (``(query, text)`` as a
  sentence pair, truncated to ``max_length``); batches are padded dynamically to their
  longest pair.
* **Pointwise** training batches are ``batch_size`` random pairs.  **Listwise** batches are
  whole query lists: ``batch_size // list_size`` queries, each with up to ``list_size``
  candidates sampled per epoch (always keeping its best-graded one); queries whose candidates
  all have the same grade carry no ranking signal and are left out of listwise training.
* Validation/test batches are in query order and sharded *by query* across ranks, so each
  query's candidates are scored together.
* Splits are made by query, never by row (:func:`split_by_query`), so no query leaks from
  training into validation.

**Mid-epoch resume.**  The training batch order of an epoch is a pure function of
``(seed, epoch, rank, world_size)``.  The datamodule's ``state_dict`` (saved in every Lightning
checkpoint) records the epoch and how many batches of it were trained; after a restart the
sampler skips exactly those batches, so the resumed epoch sees the remaining pairs once each
(Lightning on its own would restart the epoch's iteration from the first batch).
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("query", "text", "grade")
GRADE_MAX = 3


class DataError(ValueError):
    """A split is missing, empty or has the wrong columns."""


# ---------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------
def _query_bucket(query: str, seed: int) -> float:
    digest = hashlib.sha1(f"{seed}:{query}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_query(df: pd.DataFrame, fractions: Sequence[float], seed: int = 42) -> list[pd.DataFrame]:
    """Split rows into len(fractions) parts by a stable hash of the query (never by row).

    Every query lands wholly in one part; the same query goes to the same part in every run
    with the same seed, whatever else is in the frame.
    """
    if not fractions or abs(sum(fractions) - 1.0) > 1e-6 or any(f < 0 for f in fractions):
        raise ValueError(f"fractions {list(fractions)} must be >= 0 and sum to 1")
    edges = np.cumsum(fractions)[:-1]
    queries = df["query"].astype(str)
    uniq = queries.unique()
    part_of = {q: int(np.searchsorted(edges, _query_bucket(q, seed), side="right")) for q in uniq}
    parts = queries.map(part_of).to_numpy()
    return [df[parts == i].reset_index(drop=True) for i in range(len(fractions))]


def check_split(df: pd.DataFrame | None, name: str) -> pd.DataFrame:
    """Validate a split frame and return it with defaults (weight=1.0) and clean dtypes."""
    if df is None:
        raise DataError(f"{name} split is missing")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{name} split lacks columns {missing}; has {list(df.columns)}")
    if len(df) == 0:
        raise DataError(f"{name} split is empty")
    out = df.reset_index(drop=True).copy()
    out["query"] = out["query"].astype(str)
    out["text"] = out["text"].fillna("").astype(str)
    grades = pd.to_numeric(out["grade"], errors="coerce")
    if grades.isna().any() or (grades < 0).any() or (grades > GRADE_MAX).any():
        raise DataError(f"{name} split: grade must be an integer 0..{GRADE_MAX}")
    out["grade"] = grades.astype("int64")
    if "weight" in out.columns:
        w = pd.to_numeric(out["weight"], errors="coerce").fillna(1.0)
        if (w < 0).any():
            raise DataError(f"{name} split: weight must be >= 0")
        out["weight"] = w.astype("float32")
    else:
        out["weight"] = np.float32(1.0)
    return out


def query_overlap(a: pd.DataFrame, b: pd.DataFrame) -> set[str]:
    return set(a["query"].astype(str)) & set(b["query"].astype(str))


# ---------------------------------------------------------------------------------------
# dataset + collation
# ---------------------------------------------------------------------------------------
class PairDataset(Dataset):
    """Tokenised (query, text) pairs with grade, weight and an integer query id per row."""

    def __init__(self, df: pd.DataFrame, tokenizer: Any, max_length: int, batch_tokenize: int = 4096):
        self.df = df
        codes, uniques = pd.factorize(df["query"], sort=False)
        self.qid = codes.astype(np.int64)
        self.queries = list(uniques)
        self.grade = df["grade"].to_numpy(dtype=np.int64)
        self.weight = df["weight"].to_numpy(dtype=np.float32)
        self.features: dict[str, list[list[int]]] = {}
        q = df["query"].tolist()
        t = df["text"].tolist()
        for start in range(0, len(df), batch_tokenize):
            enc = tokenizer(
                q[start : start + batch_tokenize],
                t[start : start + batch_tokenize],
                truncation="longest_first",
                max_length=max_length,
                padding=False,
            )
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                if key in enc:
                    self.features.setdefault(key, []).extend(enc[key])
        self.lengths = np.fromiter((len(x) for x in self.features["input_ids"]), dtype=np.int64, count=len(df))

    def __len__(self) -> int:
        return len(self.grade)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.features.items()}
        item["grade"] = int(self.grade[i])
        item["weight"] = float(self.weight[i])
        item["qid"] = int(self.qid[i])
        item["row"] = int(i)
        return item

    def groups(self) -> list[np.ndarray]:
        """Row indices per query, in first-appearance order of the query."""
        order = np.argsort(self.qid, kind="stable")
        bounds = np.flatnonzero(np.diff(self.qid[order])) + 1
        return np.split(order, bounds)


class PairCollator:
    """Pads a list of tokenised pairs to the longest one (optionally a multiple of 8 on GPU)."""

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(it["input_ids"]) for it in items)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = int(math.ceil(longest / m) * m)
        n = len(items)
        out: dict[str, torch.Tensor] = {}
        for key, pad in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key not in items[0]:
                continue
            arr = np.full((n, longest), pad, dtype=np.int64)
            for i, it in enumerate(items):
                seq = it[key]
                arr[i, : len(seq)] = seq
            out[key] = torch.from_numpy(arr)
        out["grade"] = torch.tensor([it["grade"] for it in items], dtype=torch.long)
        out["weight"] = torch.tensor([it["weight"] for it in items], dtype=torch.float32)
        out["qid"] = torch.tensor([it["qid"] for it in items], dtype=torch.long)
        out["row"] = torch.tensor([it["row"] for it in items], dtype=torch.long)
        return out


# ---------------------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------------------
class ResumableBatchSampler:
    """Deterministic, rank-sharded, skippable batch sampler for training.

    ``units`` are the things that are shuffled: single rows (pointwise) or query groups
    (listwise, each a numpy array of row indices).  The order of epoch ``e`` depends only on
    ``(seed, e)``; each rank takes every ``world_size``-th unit after padding the unit list to
    a multiple of ``world_size`` (so all ranks run the same number of steps, as DDP needs).

    ``resume(epoch, batches_done)`` makes the next iteration over that epoch start after the
    batches already trained.  ``len()`` is always the full epoch length, which is what
    Lightning's loop counters expect.
    """

    def __init__(
        self,
        n_rows: int,
        batch_size: int,
        *,
        groups: list[np.ndarray] | None = None,
        grades: np.ndarray | None = None,
        list_size: int | None = None,
        seed: int = 42,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} / world_size {world_size}")
        self.n_rows = n_rows
        self.batch_size = batch_size  # rows (pointwise) or groups (listwise) per batch
        self.groups = groups
        self.grades = grades
        self.list_size = list_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None
        n_units = len(groups) if groups is not None else n_rows
        if n_units == 0:
            raise DataError("no training units (rows or usable query groups)")
        self._units_per_rank = math.ceil(n_units / world_size)

    # Lightning calls set_epoch on dataloader.sampler and dataloader.batch_sampler.sampler
    @property
    def sampler(self) -> "ResumableBatchSampler":
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume(self, epoch: int, batches_done: int) -> None:
        self.epoch = int(epoch)
        self._resume = (int(epoch), int(batches_done))

    def __len__(self) -> int:
        return math.ceil(self._units_per_rank / self.batch_size)

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def _unit_order(self, epoch: int, n_units: int, rng: np.random.Generator) -> np.ndarray:
        order = rng.permutation(n_units) if self.shuffle else np.arange(n_units)
        total = self._units_per_rank * self.world_size
        if total > n_units:  # pad by repeating from the start, like DistributedSampler
            order = np.concatenate([order, order[: total - n_units]])
        return order[self.rank :: self.world_size]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches (lists of row indices) this rank trains on in ``epoch``."""
        rng = self._rng(epoch)
        if self.groups is None:
            order = self._unit_order(epoch, self.n_rows, rng)
            return [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        order = self._unit_order(epoch, len(self.groups), rng)
        lists = [self._sample_list(self.groups[g], rng) for g in order]
        return [
            np.concatenate(lists[i : i + self.batch_size]).tolist() for i in range(0, len(lists), self.batch_size)
        ]

    def _sample_list(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.list_size is None or len(rows) <= self.list_size:
            return rows
        picked = rng.permutation(rows)[: self.list_size]
        if self.grades is not None:
            best = rows[np.argmax(self.grades[rows])]
            if self.grades[picked].max() < self.grades[best]:
                picked[-1] = best
        return picked

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        skip = 0
        if self._resume is not None:
            r_epoch, r_done = self._resume
            self._resume = None  # one-shot: later epochs start from their first batch
            if r_epoch == self.epoch:
                skip = min(r_done, len(batches))
                if skip:
                    log.info("resuming epoch %d after %d/%d batches", self.epoch, skip, len(batches))
        yield from batches[skip:]


class QueryShardedBatchSampler:
    """Evaluation batches: rows in query order, queries split across ranks, no padding."""

    def __init__(self, groups: list[np.ndarray], batch_size: int, rank: int = 0, world_size: int = 1):
        mine = groups[rank::world_size]
        rows = np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)
        self.batches = [rows[i : i + batch_size].tolist() for i in range(0, len(rows), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


# ---------------------------------------------------------------------------------------
# datamodule
# ---------------------------------------------------------------------------------------
class RankingDataModule(L.LightningDataModule):
    """Train/val/test dataloaders of tokenised (query, text) pairs; resumable mid-epoch."""

    def __init__(
        self,
        train_df: pd.DataFrame,
        val_df: pd.DataFrame | None = None,
        test_df: pd.DataFrame | None = None,
        *,
        tokenizer: Any,
        max_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        loss: str = "pointwise",
        list_size: int = 16,
        seed: int = 42,
        num_workers: int = 0,
        val_fraction: float = 0.1,
    ):
        super().__init__()
        train_df = check_split(train_df, "train")
        if val_df is not None and len(val_df) == 0:
            val_df = None  # a snapshot built with val_fraction=0
        if test_df is not None and len(test_df) == 0:
            test_df = None
        if val_df is None:
            train_df, val_df = split_by_query(train_df, [1 - val_fraction, val_fraction], seed=seed)
            if len(train_df) == 0 or len(val_df) == 0:
                raise DataError(
                    f"cannot hold out {val_fraction:.0%} of the training queries for validation: "
                    "too few queries; pass a val split"
                )
            log.info("no val split given: held out %d of the training queries", val_df["query"].nunique())
        val_df = check_split(val_df, "val")
        overlap = query_overlap(train_df, val_df)
        if overlap:
            log.warning(
                "%d queries appear in both train and val (e.g. %r): validation is optimistic",
                len(overlap), sorted(overlap)[0],
            )
        self.train_df, self.val_df = train_df, val_df
        self.test_df = check_split(test_df, "test") if test_df is not None else None
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.loss = loss
        self.list_size = list_size
        self.seed = seed
        self.num_workers = num_workers
        self.datasets: dict[str, PairDataset] = {}
        self._resume_state: dict[str, int] | None = None
        self._train_sampler: ResumableBatchSampler | None = None
        pad_id = getattr(tokenizer, "pad_token_id", None)
        self.collator = PairCollator(pad_token_id=0 if pad_id is None else int(pad_id))

    # ---- setup ---------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        frames = {"train": self.train_df, "val": self.val_df, "test": self.test_df}
        for name, df in frames.items():
            if df is not None and name not in self.datasets:
                self.datasets[name] = PairDataset(df, self.tokenizer, self.max_length)
                ds = self.datasets[name]
                log.info(
                    "%s: %d pairs, %d queries, mean %.1f tokens (max_length %d)",
                    name, len(ds), len(ds.queries), float(ds.lengths.mean()), self.max_length,
                )

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _pad_multiple(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and "mixed" in str(trainer.precision):
            return 8
        return None

    def train_sampler(self, rank: int = 0, world_size: int = 1) -> ResumableBatchSampler:
        self.setup("fit")
        ds = self.datasets["train"]
        groups = []
        if self.loss in ("listwise", "pairwise"):
            groups = [g for g in ds.groups() if ds.grade[g].min() != ds.grade[g].max()]
            if not groups:
                log.warning("%s: no query has candidates of different grades; training pointwise instead",
                            self.loss)
        if groups:
            dropped = len(ds.queries) - len(groups)
            if dropped:
                log.info("%s: %d queries with a single grade carry no ranking signal, skipped", self.loss, dropped)
            return ResumableBatchSampler(
                len(ds), max(1, self.batch_size // self.list_size), groups=groups, grades=ds.grade,
                list_size=self.list_size, seed=self.seed, rank=rank, world_size=world_size,
            )
        return ResumableBatchSampler(len(ds), self.batch_size, seed=self.seed, rank=rank, world_size=world_size)

    # ---- dataloaders -----------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        sampler = self.train_sampler(rank, world)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            sampler.set_epoch(trainer.current_epoch)
        if self._resume_state is not None:
            st = self._resume_state
            self._resume_state = None
            if st["batches_done"] >= st["num_batches"]:  # saved at an epoch end: next epoch, from 0
                sampler.set_epoch(st["epoch"] + 1)
            else:
                sampler.resume(st["epoch"], st["batches_done"])
        self._train_sampler = sampler
        self.collator.pad_to_multiple_of = self._pad_multiple()
        return DataLoader(
            self.datasets["train"], batch_sampler=sampler, collate_fn=self.collator,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def _eval_loader(self, name: str) -> DataLoader:
        self.setup(name)
        ds = self.datasets.get(name)
        if ds is None:
            raise DataError(f"no {name} split was given")
        rank, world = self._rank_world()
        sampler = QueryShardedBatchSampler(ds.groups(), self.eval_batch_size, rank, world)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=self.collator, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    # ---- checkpoint state (mid-epoch resume) -------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None or self._train_sampler is None:
            return {}
        epoch_loop = trainer.fit_loop.epoch_loop
        return {
            "epoch": int(trainer.current_epoch),
            # batches of this epoch whose optimizer step has run when the checkpoint is written
            "batches_done": int(epoch_loop.batch_progress.current.processed),
            "num_batches": len(self._train_sampler),
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("seed", self.seed) != self.seed:
            log.warning("checkpoint was written with seed %s, now %s: batch order differs", state_dict["seed"], self.seed)
        self._resume_state = {k: int(state_dict[k]) for k in ("epoch", "batches_done", "num_batches")}
