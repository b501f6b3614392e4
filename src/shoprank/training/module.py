"""The cross-encoder as a LightningModule, and its losses.

The model is ``AutoModelForSequenceClassification(num_labels=1)`` over the pair
``[CLS] query [SEP] product text [SEP]``; its single logit is the relevance score.

Losses (``loss=``):

* ``pointwise``: binary cross-entropy of ``sigmoid(logit)`` against ``grade / 3`` (a soft
  label in [0, 1]), each pair weighted by its ``weight`` column (e.g. an inverse-propensity
  weight from click logs): ``mean(weight * bce)``.
* ``listwise``: softmax cross-entropy over each query's candidate list (the ListNet top-one
  family, as TF-Ranking's ``SoftmaxLoss``): target distribution ``grade / sum(grade)`` within
  the list, loss ``-sum(target * log_softmax(logits))``, averaged over lists weighted by the
  list's mean ``weight``.  Lists whose grades sum to zero are skipped.
* ``pairwise``: RankNet over each query's candidate list: for every pair ``(i, j)`` of one
  query with ``grade_i > grade_j``, ``softplus(-(s_i - s_j))`` (the logistic loss of ranking
  them in the right order), weighted by the grade gap ``grade_i - grade_j`` and by
  ``weight_i * weight_j`` (a hard negative of weight 0.5 counts half), averaged over the
  total pair weight.  Uses the listwise batches (whole query lists).

Validation logs ``val_ndcg@10`` (torchmetrics ``RetrievalNormalizedDCG(top_k=10)``, graded
linear gains, queries with no relevant candidate skipped; synced across DDP ranks) and
``val_loss`` (pointwise BCE) once per validation run.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.retrieval import RetrievalNormalizedDCG

log = logging.getLogger(__name__)

GRADE_MAX = 3
VAL_METRIC = "val_ndcg@10"


def pointwise_loss(logits: torch.Tensor, grades: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted BCE-with-logits against ``grade / 3``."""
    target = grades.to(logits.dtype) / GRADE_MAX
    per_pair = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if weights is not None:
        per_pair = per_pair * weights.to(per_pair.dtype)
    return per_pair.mean()


def listwise_loss(
    logits: torch.Tensor, grades: torch.Tensor, group_ids: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax cross-entropy per query list (rows sharing a ``group_ids`` value form a list).

    Rows of a list need not be contiguous.  Returns 0 (with grad) when no list has a relevant item.
    """
    logits = logits.float()
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max().item()) + 1
    # per-group log-sum-exp, stabilised with the group max
    gmax = torch.full((n_groups,), float("-inf"), device=logits.device).scatter_reduce(
        0, inv, logits.detach(), reduce="amax"
    )
    sumexp = torch.zeros(n_groups, device=logits.device).index_add(0, inv, torch.exp(logits - gmax[inv]))
    log_softmax = logits - (torch.log(sumexp) + gmax)[inv]
    gains = grades.float()
    gsum = torch.zeros(n_groups, device=logits.device).index_add(0, inv, gains)
    valid = gsum > 0
    target = torch.where(gsum[inv] > 0, gains / gsum[inv].clamp_min(1e-12), torch.zeros_like(gains))
    per_group = -torch.zeros(n_groups, device=logits.device).index_add(0, inv, target * log_softmax)
    if weights is not None:
        counts = torch.zeros(n_groups, device=logits.device).index_add(0, inv, torch.ones_like(gains))
        gweight = torch.zeros(n_groups, device=logits.device).index_add(0, inv, weights.float()) / counts
    else:
        gweight = torch.ones(n_groups, device=logits.device)
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return (per_group[valid] * gweight[valid]).sum() / valid.sum()


def pairwise_loss(
    logits: torch.Tensor, grades: torch.Tensor, group_ids: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """RankNet: grade-gap-weighted logistic loss over every correctly ordered pair of a query."""
    logits = logits.float()
    g = grades.float()
    same = group_ids[:, None] == group_ids[None, :]
    gap = (g[:, None] - g[None, :]) * same  # > 0 where i should rank above j
    pair_w = gap.clamp_min(0.0)
    if weights is not None:
        w = weights.float()
        pair_w = pair_w * (w[:, None] * w[None, :])
    total = pair_w.sum()
    if not bool(total > 0):
        return logits.sum() * 0.0
    diff = logits[:, None] - logits[None, :]
    return (F.softplus(-diff) * pair_w).sum() / total


class CrossEncoderModule(L.LightningModule):
    """Cross-encoder ranker.

    Give either ``model_name_or_path`` (resolved with :func:`shoprank.models.resolve_base_model`,
    loaded with one output logit) or a ready ``model`` (e.g. a tiny randomly initialised BERT in
    tests, or a warm-start model).
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        *,
        model: torch.nn.Module | None = None,
        loss: str = "pointwise",
        lr: float = 2e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        ndcg_k: int = 10,
    ):
        super().__init__()
        if loss not in ("pointwise", "listwise", "pairwise"):
            raise ValueError(f"loss={loss!r}: choose 'pointwise', 'listwise' or 'pairwise'")
        # logger=False: the caller logs run parameters to MLflow itself (params are immutable there)
        self.save_hyperparameters(ignore=["model"], logger=False)
        if model is None:
            if model_name_or_path is None:
                raise ValueError("give model_name_or_path or model")
            from shoprank.models import load_cross_encoder

            model = load_cross_encoder(model_name_or_path)
        self.model = model.train()  # from_pretrained returns eval mode (dropout off)
        self.loss_name = loss
        self.val_ndcg = RetrievalNormalizedDCG(top_k=ndcg_k, empty_target_action="skip")
        self.test_ndcg = RetrievalNormalizedDCG(top_k=ndcg_k, empty_target_action="skip")
        # (epoch, global_step, val_ndcg@10) per validation run; kept in checkpoints
        self.val_history: list[dict[str, float]] = []

    # ---- forward / loss ------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        return self.model(**inputs).logits.squeeze(-1)

    def compute_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.loss_name == "listwise":
            return listwise_loss(logits, batch["grade"], batch["qid"], batch.get("weight"))
        if self.loss_name == "pairwise":
            return pairwise_loss(logits, batch["grade"], batch["qid"], batch.get("weight"))
        return pointwise_loss(logits.float(), batch["grade"], batch.get("weight"))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss = self.compute_loss(logits, batch)
        n = batch["input_ids"].shape[0]
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=n, sync_dist=True)
        return loss

    # ---- evaluation ---------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, torch.Tensor], metric: RetrievalNormalizedDCG, prefix: str) -> None:
        logits = self(batch).float()
        metric.update(logits, batch["grade"], indexes=batch["qid"])
        n = batch["input_ids"].shape[0]
        self.log(f"{prefix}_loss", pointwise_loss(logits, batch["grade"]), on_epoch=True, batch_size=n, sync_dist=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_ndcg, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_ndcg, "test")

    def on_validation_epoch_end(self) -> None:
        value = self.val_ndcg.compute()  # gathers every rank's pairs before computing
        self.val_ndcg.reset()
        self.log(VAL_METRIC, value, prog_bar=True, sync_dist=True)  # same value on every rank
        if not self.trainer.sanity_checking:
            self.val_history.append(
                {"epoch": int(self.current_epoch), "step": int(self.global_step), VAL_METRIC: float(value)}
            )

    def on_test_epoch_end(self) -> None:
        value = self.test_ndcg.compute()
        self.test_ndcg.reset()
        self.log("test_ndcg@10", value)

    # ---- optimiser -------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
        decay, plain = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (plain if name.endswith(no_decay) else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": plain, "weight_decay": 0.0}],
            lr=self.hparams.lr,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(total * self.hparams.warmup_ratio)

        def lr_lambda(step: int) -> float:  # linear warm-up, then linear decay to 0
            if step < warmup:
                return (step + 1) / max(1, warmup)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoint extras ------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["shoprank_val_history"] = list(self.val_history)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.val_history = list(checkpoint.get("shoprank_val_history", []))
