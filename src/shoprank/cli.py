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

    errors: list[type[BaseException]] = [ConfigError, StackError, StorageError]
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

def cmd_generate(args: argparse.Namespace) -> int:
    from shoprank.data.synthetic import generate_marketplace
    from shoprank.storage import Storage

    settings = get_settings()
    storage = Storage(settings)
    storage.ensure_bucket()
    market = generate_marketplace(n_products=args.products, n_queries=args.queries, seed=args.seed,
                                  start=args.date)
    market.write_to_storage(storage, args.date)
    print(f"wrote synthetic marketplace for {args.date} to s3://{settings.bucket}/raw/ "
          f"({len(market.catalog)} products, {len(market.queries)} queries, {len(market.judgments)} judgments)")
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
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--date", type=_date, default=dt.date.today())
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("validate", help="validate one raw partition with Great Expectations")
    p.add_argument("dataset", choices=["catalog", "judgments", "feedback", "queries"])
    p.add_argument("--date", type=_date, required=True)
    p.add_argument("--run-id", default=f"manual__{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("config", help="print the resolved settings (no secrets)")
    p.add_argument("--table", action="store_true", help="print the README configuration table")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("demo", help="the whole story on the embedded stack (see README)")
    p.add_argument("--days", type=int, default=3)
    p.add_argument("--products", type=int, default=1500)
    p.add_argument("--queries", type=int, default=200)
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
