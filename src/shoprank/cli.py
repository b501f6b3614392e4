"""`shoprank ...`: everything a DAG does, runnable without Airflow.

Errors the user can fix (settings, ports, unreachable servers, bad data) print one clear
message and exit non-zero, without a traceback.  Set SHOPRANK_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys

from shoprank.config import ConfigError, get_settings, settings_table

log = logging.getLogger("shoprank")


def _user_errors() -> tuple[type[BaseException], ...]:
    from shoprank.stack import StackError
    from shoprank.storage import StorageError

    from shoprank.registry import RegistryError

    from shoprank.data.loaders import LoaderError

    from shoprank.serving.export import ExportError

    errors: list[type[BaseException]] = [ConfigError, StackError, StorageError, RegistryError, LoaderError,
                                         ExportError]
    try:
        from shoprank.validation import ValidationError  # type: ignore[attr-defined]

        errors.append(ValidationError)
    except ImportError:
        pass
    return tuple(errors)


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date in YYYY-MM-DD form") from None


# ---- stack -----------------------------------------------------------------------------

def cmd_stack(args: argparse.Namespace) -> int:
    from shoprank.stack import SERVICES, Stack, prepared_settings

    settings = prepared_settings()
    stack = Stack(settings)
    if args.action == "up":
        names = tuple(args.services) if args.services else SERVICES
        stack.up(names)
        print_urls(stack, first_time=True)
    elif args.action == "down":
        stack.down()
        print(f"stack stopped; data kept under {settings.home}")
    else:
        status = stack.status()
        width = max(map(len, status))
        for name, st in status.items():
            state = "healthy" if st["healthy"] else ("running, unhealthy" if st["running"] else "stopped")
            pid = f"pid {st['pid']}" if st["running"] else ""
            print(f"{name:<{width}}  {state:<18} {pid:<10} log: {st['log']}")
        if not all(st["healthy"] for st in status.values()):
            return 3
    return 0


def print_urls(stack, first_time: bool = False) -> None:
    from shoprank.stack import secret

    print("\nshoprank stack is up:")
    for name, url in stack.urls().items():
        print(f"  {name:<12} {url}")
    print(f"  Airflow login: admin / {secret(stack.settings, 'SHOPRANK_AIRFLOW_ADMIN_PASSWORD')}"
          f"  (kept in {stack.settings.home / 'stack.env'})")
    print("  Stop it with: shoprank stack down   (or: make down)")


# ---- data ------------------------------------------------------------------------------

# `shoprank generate` rates when not given: the default profile keeps the demo's shoppers (many
# synonyms and typos); another profile uses its own rates (synthetic.PROFILES).
GENERATE_DEFAULT_RATES = {"synonym_rate": 0.8, "typo_rate": 0.3}


def cmd_generate(args: argparse.Namespace) -> int:
    from shoprank.data.synthetic import PROFILES, generate_marketplace
    from shoprank.storage import Storage

    settings = get_settings()
    storage = Storage(settings)
    storage.ensure_bucket()
    profile = PROFILES[args.profile]
    fallback = GENERATE_DEFAULT_RATES if args.profile == "default" else {
        "synonym_rate": profile.synonym_rate, "typo_rate": profile.typo_rate}
    rates = {
        "synonym_rate": fallback["synonym_rate"] if args.synonym_rate is None else args.synonym_rate,
        "typo_rate": fallback["typo_rate"] if args.typo_rate is None else args.typo_rate,
        "inflection_rate": profile.inflection_rate,
    }
    market = generate_marketplace(n_products=args.products, n_queries=args.queries, seed=args.seed,
                                  start=args.date, profile=args.profile, **rates)
    market.write_to_storage(storage, args.date)
    from shoprank.simulation import save_marketplace_params

    save_marketplace_params(storage, n_products=args.products, n_queries=args.queries, seed=args.seed,
                            start=args.date.isoformat(), profile=args.profile, **rates)
    grades = market.judgments["grade"].value_counts().sort_index().to_dict()
    print(f"wrote synthetic marketplace ({args.profile} profile) for {args.date} to s3://{settings.bucket}/raw/ "
          f"({len(market.catalog)} products, {len(market.queries)} queries, {len(market.judgments)} judgments; "
          f"grades {grades})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from shoprank.data.loaders import LoaderError, load, write_loaded
    from shoprank.storage import Storage

    options: dict = {"max_queries": args.max_queries,
                     "as_of": dt.datetime.combine(args.date, dt.time.min, tzinfo=dt.timezone.utc)}
    if args.kind == "esci":
        options["locale"] = None if args.locale == "all" else (args.locale or "us")
        options["small_version"] = not args.large_version
    elif args.locale or args.large_version:
        raise LoaderError("--locale and --large-version apply to esci only")
    data = load(args.kind, args.path, **options)
    settings = get_settings()
    storage = Storage(settings)
    storage.ensure_bucket()
    write_loaded(storage, data, args.date)
    s = data.summary()
    print(f"imported {args.kind} from {args.path} into s3://{settings.bucket}/raw/ for {args.date} "
          f"({s['products']} products, {s['queries']} queries, {s['judgments']} judgments; grades {s['grades']})")
    if data.warnings:
        print(f"{len(data.warnings)} warning(s) while importing (missing optional files/columns, dropped rows; "
              "logged above)")
    print(f"next: shoprank validate catalog --date {args.date}, then trigger shoprank_train for that date")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.table:
        print("| Variable | Default | Meaning |\n|---|---|---|")
        for name, default, doc in settings_table():
            print(f"| `{name}` | `{default}` | {doc} |")
        return 0
    print(json.dumps(get_settings().public_dict(), indent=2))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from shoprank.validation import validate_partition  # type: ignore[attr-defined]
    from shoprank.storage import Storage

    storage = Storage(get_settings())
    outcome = validate_partition(storage, args.dataset, args.date, run_id=args.run_id)
    print(outcome.summary() if hasattr(outcome, "summary") else outcome)
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    import getpass

    from shoprank.registry import Registry
    from shoprank.storage import Storage

    settings = get_settings()
    registry = Registry(settings, Storage(settings))
    actor = args.actor or os.environ.get("USER") or getpass.getuser()
    if args.action == "rollback":
        record = registry.rollback(args.target or "previous", actor=actor, reason=args.reason or "rollback from CLI")
        print(f"champion of {registry.name} is now version {record['version']} (was {record.get('rolled_back_from')})")
    elif args.action == "status":
        for alias in ("champion", "challenger", "previous"):
            mv = registry.version_by_alias(alias)
            print(f"{alias:<11} {'version ' + mv.version if mv else '-'}")
    elif args.action == "audit":
        for r in registry.audit_trail():
            print(f"{r['ts']}  {r['action']:<9} {r['alias']:<10} v{r['version']:<4} by {r['actor']}: {r['reason']}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from shoprank.simulation import simulate_and_write

    out = simulate_and_write(get_settings(), args.date, n_sessions=args.sessions, seed=args.seed,
                             ranker=args.ranker, bot_fraction=args.bot_fraction)
    print(json.dumps(out, indent=2))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from shoprank.daily import merge_late_feedback, pending_late_days
    from shoprank.storage import Storage

    storage = Storage(get_settings())
    if args.action == "pending":
        days = pending_late_days(storage, before="9999-12-31")
        print("\n".join(f"raw/feedback_late/dt={d}/" for d in days) if days else "no late events are waiting")
        return 0
    if not args.date:
        print("shoprank events merge-late: --date YYYY-MM-DD is required", file=sys.stderr)
        return 2
    day = args.date.isoformat()
    moved = merge_late_feedback(storage, day)
    print(f"moved {len(moved)} late part(s) into raw/feedback/dt={day}/" + "".join(f"\n  {k}" for k in moved))
    if moved:
        print(f"next: re-run the daily update of {day} (Airflow UI: Clear its run, or trigger shoprank_daily_update "
              f"with logical date {day}) to validate them with the rest of the day")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from shoprank.serving.app import serve
    from shoprank.stack import prepared_settings

    serve(prepared_settings(), host=args.host, port=args.port)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from shoprank.serving.export import export
    from shoprank.storage import Storage

    settings = get_settings()
    report = export(settings, Storage(settings), args.version, force=args.force, tolerance=args.tolerance)
    return 0 if report["accepted"] else 3


def cmd_demo(args: argparse.Namespace) -> int:
    from shoprank.demo import run_demo

    return run_demo(days=args.days, products=args.products, queries=args.queries, keep_running=True)


# ---- entry -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoprank", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="start/stop/check the embedded local stack (S3, MLflow, Airflow)")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--services", nargs="*", help="subset of services (default: all)")
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("generate", help="write a synthetic marketplace (catalog, queries, judgments) to S3")
    p.add_argument("--products", type=int, default=2000)
    p.add_argument("--queries", type=int, default=600,
                   help="judged queries (default 600: the test split (20%%) then holds about 120 queries, above the "
                        "gate's minimum of SHOPRANK_GATE_MIN_TEST_QUERIES=100)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--date", type=_date, default=dt.date.today())
    p.add_argument("--profile", choices=["default", "realistic"], default="default",
                   help="default: the demo's shop (20-40 judgments per query, a third of them irrelevant, "
                        "shoppers who often use other words than the catalogue). realistic: like public "
                        "e-commerce relevance sets (ESCI, WANDS): 8-20 judgments per query sampled from the "
                        "top results of a search engine, mostly relevant; accessories and keyword-stuffed "
                        "listings that repeat the query's words; brand and model-code queries; fewer synonyms")
    p.add_argument("--synonym-rate", type=float, default=None,
                   help="chance that a query uses words the catalogue never uses (BM25 cannot match them); "
                        "default 0.8 with --profile default, the profile's own rate (0.12) with realistic")
    p.add_argument("--typo-rate", type=float, default=None,
                   help="chance that a query has a typo; default 0.3 with --profile default, 0.08 with realistic")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("import", help="load a public dataset (ESCI, WANDS, Home Depot) into raw/ partitions")
    p.add_argument("kind", choices=["esci", "wands", "homedepot"])
    p.add_argument("path", help="folder holding the dataset's files (as published)")
    p.add_argument("--date", type=_date, required=True, help="partition date; also the products' created_at")
    p.add_argument("--locale", help="esci only: us (default), es, jp or all")
    p.add_argument("--large-version", action="store_true", help="esci only: all examples, not only small_version")
    p.add_argument("--max-queries", type=int, help="keep at most N queries (stable hash) and the products they judge")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("validate", help="validate one raw partition with Great Expectations")
    p.add_argument("dataset", choices=["catalog", "judgments", "feedback", "queries"])
    p.add_argument("--date", type=_date, required=True)
    p.add_argument("--run-id", default=f"manual__{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("registry", help="model registry: aliases, audit trail, rollback")
    p.add_argument("action", choices=["status", "audit", "rollback"])
    p.add_argument("--target", help="rollback target: a version number or an alias (default: previous)")
    p.add_argument("--reason", help="recorded in the audit trail")
    p.add_argument("--actor", help="who does it (default: $USER)")
    p.set_defaults(func=cmd_registry)

    p = sub.add_parser("simulate", help="simulate a day of shopper traffic against a ranker and write raw/feedback")
    p.add_argument("--date", type=_date, required=True)
    p.add_argument("--sessions", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bot-fraction", type=float, default=0.0, help="share of bot-like sessions to inject")
    p.add_argument("--ranker", choices=["champion", "bm25", "random"], default="champion")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("events", help="late events: list days waiting in raw/feedback_late/, merge one into its day")
    p.add_argument("action", choices=["pending", "merge-late"],
                   help="pending: list the days with late events; merge-late: move --date's late parts into "
                        "raw/feedback/dt=DATE/ (then re-run that date)")
    p.add_argument("--date", type=_date, help="the day whose late events to merge (YYYY-MM-DD)")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("config", help="print the resolved settings (no secrets)")
    p.add_argument("--table", action="store_true", help="print the README configuration table")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("serve", help="ranking API: POST /rank with @champion, POST /events, GET /metrics")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export a model version to ONNX fp32 + int8, checked against PyTorch")
    p.add_argument("--version", default="champion", help="a version number or an alias (default: champion)")
    p.add_argument("--force", action="store_true", help="re-export a version that was already exported")
    p.add_argument("--tolerance", type=float,
                   help="max |NDCG@10 delta| vs PyTorch (default: SHOPRANK_EXPORT_MAX_NDCG_DELTA, 0.005)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="the whole story on the embedded stack (see README)")
    p.add_argument("--days", type=int, default=3, help="simulated days of traffic and daily updates (default 3)")
    p.add_argument("--products", type=int, default=1500, help="catalogue size of the synthetic shop (default 1500)")
    p.add_argument("--queries", type=int, default=600,
                   help="judged queries (default 600: a golden test split of ~120 queries, above the gate's "
                        "SHOPRANK_GATE_MIN_TEST_QUERIES=100)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except _user_errors() as exc:
        if os.environ.get("SHOPRANK_DEBUG"):
            raise
        print(f"shoprank: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
