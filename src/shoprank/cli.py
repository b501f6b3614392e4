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
import textwrap

from shoprank.config import ConfigError, get_settings

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
    print(f"  MLflow login:  admin / {secret(stack.settings, 'MLFLOW_AUTH_ADMIN_PASSWORD')}"
          f"  (same file; read-only accounts for people: shoprank mlflow-user add NAME)")
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
    from shoprank.config import markdown_table

    if args.table:
        print(markdown_table(), end="")
        return 0
    settings = get_settings()
    if args.json:
        print(json.dumps(settings.public_dict(), indent=2))
        return 0
    shown = settings.public_dict()
    group = None
    for g, name, env, _value, _info in settings.values():
        if g != group:
            print(f"[{g}]")
            group = g
        print(f"  {env:<46} {shown[g][name]!s:<40} ({settings.source_of(env)})")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from shoprank.validation import validate_partition  # type: ignore[attr-defined]
    from shoprank.storage import Storage

    storage = Storage(get_settings())
    run_id = args.run_id or f"manual__{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}"
    outcome = validate_partition(storage, args.dataset, args.date, run_id=run_id)
    print(outcome.summary() if hasattr(outcome, "summary") else outcome)
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    import getpass

    from shoprank.registry import Registry, summary_line
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
            print(summary_line(r))
    return 0


def event_count(value: str) -> int:
    """A positive number of events: 10000000, 10_000_000, 10M or 250k."""
    text = value.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    try:
        n = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of events (e.g. 10000000 or 10M)")
    return n


def cmd_simulate(args: argparse.Namespace) -> int:
    from shoprank.data.bulk_simulator import RANKERS as BULK_RANKERS
    from shoprank.simulation import simulate_and_write

    if args.events is not None and args.ranker not in BULK_RANKERS:
        print(f"shoprank simulate: --events generates the day in bulk and ranks with --ranker "
              f"{' or --ranker '.join(BULK_RANKERS)}, not {args.ranker} (the champion and bm25 rank one request "
              "at a time: use --sessions)", file=sys.stderr)
        return 2
    out = simulate_and_write(get_settings(), args.date, n_sessions=args.sessions, seed=args.seed,
                             ranker=args.ranker, bot_fraction=args.bot_fraction, n_events=args.events)
    print(json.dumps(out, indent=2))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from shoprank.serving.events import late_event_days, merge_late_events
    from shoprank.storage import Storage

    if args.action == "landed":
        return _events_landed(args)
    storage = Storage(get_settings())
    if args.action == "pending":
        days = late_event_days(storage, before="9999-12-31")
        print("\n".join(f"raw/feedback_late/dt={d}/" for d in days) if days else "no late events are waiting")
        return 0
    if not args.date:
        print("shoprank events merge-late: --date YYYY-MM-DD is required", file=sys.stderr)
        return 2
    day = args.date.isoformat()
    moved = merge_late_events(storage, day)
    print(f"moved {len(moved)} late part(s) into raw/feedback/dt={day}/" + "".join(f"\n  {k}" for k in moved))
    if moved:
        print(f"next: re-run the daily update of {day} (Airflow UI: Clear its run, or trigger shoprank_daily_update "
              f"with logical date {day}) to validate them with the rest of the day")
    return 0


def _events_landed(args: argparse.Namespace) -> int:
    """`shoprank events landed --date D`: the asset event that starts D's daily update (asset mode)."""
    import urllib.error

    from shoprank.airflow_client import AirflowAPIError, client_for
    from shoprank.assets import announce_landed

    settings = get_settings()
    day = args.date.isoformat()
    try:
        out = announce_landed(client_for(settings), settings.bucket, day)
    except (AirflowAPIError, urllib.error.URLError, OSError) as exc:
        print(f"shoprank events landed: {settings.airflow_url}: {exc}", file=sys.stderr)
        return 2
    asset = out["asset"]
    print(f"asset event {out['event']['id']}: {asset['name']} ({asset['uri']}) landed for {day}, partition key {day}")
    if out["scheduled_dags"]:
        print(f"Airflow queues a run of {', '.join(out['scheduled_dags'])} for {day} (Airflow UI: Assets -> "
              f"{asset['name']}, or the DAG's runs with partition key {day})")
    else:
        print(f"no DAG is scheduled on {asset['name']}: shoprank_daily_update runs on its clock "
              "(SHOPRANK_DAILY_TRIGGER=schedule); the event is recorded only")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from shoprank.serving.app import serve

    # get_settings, not prepared_settings: serving reads its secrets, it never generates them
    serve(get_settings(), host=args.host, port=args.port)
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

class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions keep their line breaks (the example lines); an option's help ends with its
    default unless the help already states it or there is none to state (None, a flag that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or "default" in text.lower() or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class _ProbeFailed(Exception):
    """A suggested command line did not parse (raised instead of exiting while checking a hint)."""


class _Parser(argparse.ArgumentParser):
    """argparse, plus a hint when a positional is given as an option.

    ``shoprank validate --dataset catalog --date D`` fails as argparse says ("unrecognized
    arguments: --dataset", exit code 2), followed by ``hint: dataset is positional (no --dataset):
    shoprank validate catalog --date D``.  The suggested command line is printed only if it parses;
    otherwise the hint shows the usage, positionals in order.  A subcommand reports its own
    unrecognized arguments (argparse leaves that to the root parser, which does not know the
    subcommand's positionals), so the usage printed is the subcommand's.
    """

    _probing = False  # class-wide: set while a suggested command line is being checked

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self._argv: list[str] = []
        self._subcommand = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._argv = list(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._subcommand:
            self.error("unrecognized arguments: " + " ".join(extras))
        return namespace, extras

    def error(self, message: str):  # type: ignore[override]
        if _Parser._probing:
            raise _ProbeFailed(message)
        hint = self._positional_hint()
        super().error(f"{message}\n{hint}" if hint else message)

    def _positional_hint(self) -> str | None:
        import shlex

        positionals = {a.dest for a in self._actions if not a.option_strings and a.dest != argparse.SUPPRESS}
        known = {s for a in self._actions for s in a.option_strings}
        for i, token in enumerate(self._argv):
            if token == "--":
                break
            flag, eq, value = token.partition("=")
            if not flag.startswith("--") or flag in known:
                continue
            name = flag[2:].replace("-", "_")
            if name not in positionals:
                continue
            rest = self._argv[:i] + self._argv[i + 1:]
            candidates = [self._argv[:i] + [value] + self._argv[i + 1:]] if eq else [rest]
            if not eq and i < len(rest):  # `--path DIR` where DIR landed in another positional's place
                moved = rest[:i] + rest[i + 1:]
                candidates += [moved[:j] + [rest[i]] + moved[j:] for j in range(len(moved) + 1)]
            for fixed in candidates:
                if self._parses(fixed):
                    return f"hint: {name} is positional (no {flag}): {self.prog} {shlex.join(fixed)}".rstrip()
            usage = " ".join(self.format_usage().split()[1:])
            return f"hint: {name} is positional (no {flag}); give the positionals in this order: {usage}"
        return None

    def _parses(self, argv: list[str]) -> bool:
        import contextlib
        import io

        saved = self._argv
        _Parser._probing = True
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                self.parse_args(argv)
            return True
        except (_ProbeFailed, SystemExit):
            return False
        finally:
            _Parser._probing = False
            self._argv = saved


def _command(sub, name: str, summary: str, description: str, *examples: str) -> _Parser:
    """A subcommand: ``summary`` in its group's list, ``description`` and example lines in its own --help."""
    text = textwrap.fill(description, 79)
    if examples:
        text += "\n\nexample" + ("s" if len(examples) > 1 else "") + ":\n" + "\n".join(f"  {e}" for e in examples)
    p = sub.add_parser(name, help=summary, description=text, formatter_class=_HelpFormatter)
    p._subcommand = True
    return p


def _add_date(p: argparse.ArgumentParser, what: str, **kwargs) -> None:
    p.add_argument("--date", type=_date, metavar="YYYY-MM-DD", help=what, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shoprank", description=__doc__.splitlines()[0] + "\n\n"
                     "Every command documents its options, their defaults and formats:\n"
                     "  shoprank COMMAND --help   (and shoprank COMMAND ACTION --help for stack, registry, events)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at DEBUG level (default: INFO); give it before the command: shoprank -v stack up")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands (shoprank COMMAND --help for each one's options)")

    # stack up|down|status
    p = _command(sub, "stack", "start/stop/check the embedded local stack (S3, MLflow, Airflow)",
                 "The embedded local stack: an S3-compatible server, MLflow and Airflow as local processes "
                 "under $SHOPRANK_HOME, each with a health check; secrets are generated once into "
                 "$SHOPRANK_HOME/stack.env.",
                 "shoprank stack up", "shoprank stack up --services s3 mlflow", "shoprank stack status")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION",
                               title="actions (shoprank stack ACTION --help)")
    a = _command(actions, "up", "start the services (all by default) and print their URLs and logins",
                 "Start the services in order, wait for each one's health check and print the URLs and the "
                 "Airflow and MLflow logins. Services already running are kept.",
                 "shoprank stack up", "shoprank stack up --services s3 mlflow")
    from shoprank.stack import SERVICES

    a.add_argument("--services", nargs="*", metavar="SERVICE", choices=list(SERVICES),
                   help=f"services to start, space-separated, from: {', '.join(SERVICES)} (default: all of them)")
    _command(actions, "down", "stop every service (data is kept)",
             "Stop every service of the stack; the data under $SHOPRANK_HOME is kept.", "shoprank stack down")
    _command(actions, "status", "each service's state, pid and log file (exit code 3 if one is unhealthy)",
             "Print each service's state (healthy, running but unhealthy, stopped), its pid and its log "
             "file. Exit code 3 when a service is not healthy.", "shoprank stack status")
    p.set_defaults(func=cmd_stack, services=None)

    p = _command(sub, "generate", "write a synthetic marketplace (catalog, queries, judgments) to S3",
                 "Write a synthetic marketplace (catalog, queries, relevance judgments) into "
                 "s3://BUCKET/raw/ partitions of --date, and its parameters (used by `shoprank simulate`).",
                 "shoprank generate --products 2000 --queries 600 --date 2026-11-01",
                 "shoprank generate --profile realistic --date 2026-11-01")
    p.add_argument("--products", type=int, default=2000, metavar="N",
                   help="catalogue size: number of products, an integer")
    p.add_argument("--queries", type=int, default=600, metavar="N",
                   help="judged queries, an integer (default 600: the test split (20%%) then holds about 120 "
                        "queries, above the gate's minimum of SHOPRANK_GATE_MIN_TEST_QUERIES=100)")
    p.add_argument("--seed", type=int, default=42, metavar="N",
                   help="random seed, an integer: the same seed and options write the same marketplace")
    _add_date(p, "partition date and the marketplace's first day, YYYY-MM-DD (default: today)",
              default=dt.date.today())
    p.add_argument("--profile", choices=["default", "realistic"], default="default",
                   help="default: the demo's shop (20-40 judgments per query, a third of them irrelevant, "
                        "shoppers who often use other words than the catalogue). realistic: like public "
                        "e-commerce relevance sets (ESCI, WANDS): 8-20 judgments per query sampled from the "
                        "top results of a search engine, mostly relevant; accessories and keyword-stuffed "
                        "listings that repeat the query's words; brand and model-code queries; fewer synonyms "
                        "(default: %(default)s)")
    p.add_argument("--synonym-rate", type=float, default=None, metavar="RATE",
                   help="chance that a query uses words the catalogue never uses (BM25 cannot match them), "
                        "a number from 0 to 1; default 0.8 with --profile default, the profile's own rate "
                        "(0.12) with realistic")
    p.add_argument("--typo-rate", type=float, default=None, metavar="RATE",
                   help="chance that a query has a typo, a number from 0 to 1; default 0.3 with --profile "
                        "default, 0.08 with realistic")
    p.set_defaults(func=cmd_generate)

    p = _command(sub, "import", "load a public dataset (ESCI, WANDS, Home Depot) into raw/ partitions",
                 "Load a public e-commerce relevance dataset, as published, into the raw/ partitions of --date "
                 "(catalog, queries, judgments); then validate it and trigger shoprank_train for that date.",
                 "shoprank import esci ~/data/esci --date 2026-11-01 --max-queries 2000",
                 "shoprank import wands ~/data/WANDS/dataset --date 2026-11-01")
    p.add_argument("kind", choices=["esci", "wands", "homedepot"],
                   help="the dataset: esci (Amazon Shopping Queries), wands (Wayfair ANnotation DataSet) or "
                        "homedepot (Home Depot Product Search Relevance)")
    p.add_argument("path", help="folder holding the dataset's files, as published (a local path)")
    _add_date(p, "partition date, YYYY-MM-DD; also the products' created_at (required)", required=True)
    p.add_argument("--locale", metavar="LOCALE",
                   help="esci only: the products' locale: us, es, jp or all (default: us)")
    p.add_argument("--large-version", action="store_true",
                   help="esci only: all examples, not only the small_version subset (default: off)")
    p.add_argument("--max-queries", type=int, metavar="N",
                   help="keep at most N queries (chosen by a stable hash) and the products they judge, an "
                        "integer (default: all)")
    p.set_defaults(func=cmd_import)

    p = _command(sub, "validate", "validate one raw partition with Great Expectations",
                 "Validate raw/DATASET/dt=DATE/ with its Great Expectations suite: a valid partition is "
                 "promoted, an invalid one is quarantined (quarantine/DATASET/dt=DATE/RUN_ID/) and the exit "
                 "code is non-zero.",
                 "shoprank validate catalog --date 2026-11-20",
                 "shoprank validate feedback --date 2026-11-20 --run-id recheck-1")
    p.add_argument("dataset", choices=["catalog", "judgments", "feedback", "queries"],
                   help="which raw partition to validate (raw/DATASET/dt=DATE/); a positional: "
                        "shoprank validate catalog --date ...")
    _add_date(p, "the partition's date, YYYY-MM-DD (required)", required=True)
    p.add_argument("--run-id", metavar="ID",
                   help="names this validation run in the results and the quarantine path; letters, digits "
                        "and -_.= (others become _) (default: manual__ and the UTC time, e.g. "
                        "manual__20261120T093000)")
    p.set_defaults(func=cmd_validate)

    # registry status|audit|rollback
    p = _command(sub, "registry", "model registry: aliases, audit trail, rollback",
                 "The MLflow model registry of the ranker: which versions hold the champion, challenger and "
                 "previous aliases, the audit trail of every alias move, and rollback of the champion.",
                 "shoprank registry status", "shoprank registry audit",
                 "shoprank registry rollback --target 3 --reason \"NDCG dropped after v4\"")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION",
                               title="actions (shoprank registry ACTION --help)")
    _command(actions, "status", "the versions holding the champion, challenger and previous aliases",
             "Print the version that holds each alias (champion, challenger, previous), or - for none.",
             "shoprank registry status")
    _command(actions, "audit", "the audit trail: every alias move, when, by whom and why",
             "Print the audit trail, oldest first: time, action, alias, version, actor and reason.",
             "shoprank registry audit")
    a = _command(actions, "rollback", "move the champion alias back to an earlier version",
                 "Move the champion alias back to --target (the current champion becomes previous) and record "
                 "it in the audit trail. Only a version that was champion before or passed the gate is "
                 "accepted; an unknown version is refused with the list of known ones.",
                 "shoprank registry rollback", "shoprank registry rollback --target 3 --reason \"bad v4\"")
    a.add_argument("--target", metavar="VERSION|ALIAS",
                   help="the version to make champion: a version number (3) or an alias (previous, "
                        "challenger) (default: previous)")
    a.add_argument("--reason", metavar="TEXT", help="why, free text recorded in the audit trail "
                                                    "(default: \"rollback from CLI\")")
    a.add_argument("--actor", metavar="NAME", help="who does it, recorded in the audit trail (default: $USER)")
    p.set_defaults(func=cmd_registry, target=None, reason=None, actor=None)

    p = _command(sub, "simulate", "simulate a day of shopper traffic against a ranker and write raw/feedback",
                 "Simulate one day of shopper sessions (searches, clicks, add-to-carts, purchases) against a "
                 "ranker and write them to raw/feedback/dt=DATE/, with that day's catalogue. Needs the "
                 "marketplace of `shoprank generate`. --sessions plays each request through the ranker; "
                 "--events generates millions of events in bulk (vectorised, written 1M events per Parquet "
                 "part; --ranker random or oracle).",
                 "shoprank simulate --date 2026-11-02 --ranker champion",
                 "shoprank simulate --date 2026-11-03 --sessions 200 --bot-fraction 0.05",
                 "shoprank simulate --date 2026-11-04 --events 10000000 --ranker random --bot-fraction 0.002")
    _add_date(p, "the simulated day, YYYY-MM-DD (required)", required=True)
    p.add_argument("--sessions", type=int, default=80, metavar="N", help="shopper sessions to simulate, an integer")
    p.add_argument("--events", type=event_count, metavar="N",
                   help="generate about N feedback events in bulk instead of playing --sessions: an integer "
                        "(10000000, 10_000_000, 10M or 250k); needs --ranker random or oracle (default: off)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="random seed of the shoppers' behaviour, an integer")
    p.add_argument("--bot-fraction", type=float, default=0.0, metavar="SHARE",
                   help="share of bot-like sessions to inject, a number from 0 to 1 (default: 0, none)")
    p.add_argument("--ranker", choices=["champion", "bm25", "random", "oracle"], default="champion",
                   help="what ranks the results the shoppers see: champion (the registry's @champion model), "
                        "bm25 (lexical baseline), random, or oracle (the synthetic shop's hidden relevance, an "
                        "upper bound)")
    p.set_defaults(func=cmd_simulate)

    # events pending|merge-late
    p = _command(sub, "events", "late events: list days waiting in raw/feedback_late/, merge one into its day",
                 "Events that arrive after their day's daily update wait in raw/feedback_late/dt=DATE/. List "
                 "those days, or move one day's late parts into raw/feedback/dt=DATE/ and then re-run that "
                 "day's daily update. `landed` tells Airflow a day's feedback has landed.",
                 "shoprank events pending", "shoprank events merge-late --date 2026-11-20",
                 "shoprank events landed --date 2026-11-20")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION",
                               title="actions (shoprank events ACTION --help)")
    _command(actions, "pending", "list the days with late events waiting",
             "List the raw/feedback_late/dt=DATE/ prefixes that hold late events.", "shoprank events pending")
    a = _command(actions, "merge-late", "move one day's late events into raw/feedback/dt=DATE/",
                 "Move --date's late parts from raw/feedback_late/ into raw/feedback/dt=DATE/; then re-run "
                 "that day's daily update (Airflow UI: Clear its run) to validate them with the rest of "
                 "the day.", "shoprank events merge-late --date 2026-11-20")
    _add_date(a, "the day whose late events to merge, YYYY-MM-DD (required)", required=True)
    a = _command(actions, "landed", "announce that a day's raw feedback has landed (starts its daily update)",
                 "Post the Airflow asset event 'raw feedback of --date has landed' (asset shoprank-feedback-raw, "
                 "partition key and extra.date = the day) over Airflow's REST API as admin. With "
                 "SHOPRANK_DAILY_TRIGGER=asset it starts that day's run of shoprank_daily_update; with the "
                 "default (schedule) the event is only recorded.", "shoprank events landed --date 2026-11-20")
    _add_date(a, "the day whose raw/feedback/dt=DATE/ partition has landed, YYYY-MM-DD (required)", required=True)
    p.set_defaults(func=cmd_events, date=None)

    p = _command(sub, "config", "print every setting, its value (secrets hidden) and where it came from",
                 "Print every setting by group: its environment variable, its value (secrets hidden) and "
                 "where it came from (the environment, a file, or the default).",
                 "shoprank config", "shoprank config --json", "shoprank config --table > table.md")
    p.add_argument("--table", action="store_true",
                   help="print the README configuration table instead, in Markdown (default: off)")
    p.add_argument("--json", action="store_true",
                   help="print the resolved values as JSON, by group, secrets hidden (default: off)")
    p.set_defaults(func=cmd_config)

    p = _command(sub, "serve", "ranking API: POST /rank with @champion, POST /events, GET /metrics",
                 "Run the ranking API with uvicorn: POST /rank ranks with the registry's @champion, POST "
                 "/events takes shopper events, GET /metrics serves Prometheus metrics (docs/serving.md). "
                 "Ctrl-C flushes buffered events first.",
                 "shoprank serve --port 8000", "shoprank serve --host 0.0.0.0 --port 8080")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                   help="address to listen on, an IP address or host name (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, metavar="PORT", help="TCP port to listen on, an integer")
    p.set_defaults(func=cmd_serve)

    p = _command(sub, "export", "export a model version to ONNX fp32 + int8, checked against PyTorch",
                 "Export a registered model version to ONNX (fp32 and int8), check each against PyTorch on the "
                 "test split of the version's data snapshot, log the accepted ones to its MLflow run and tag "
                 "the version with the result. Exit code 3 if none is accepted.", "shoprank export", "shoprank export --version 3 --force --tolerance 0.01")
    p.add_argument("--version", default="champion", metavar="VERSION|ALIAS",
                   help="the model version: a version number (3) or an alias (champion, challenger, previous) "
                        "(default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="export again a version that was already exported (default: off)")
    p.add_argument("--tolerance", type=float, metavar="DELTA",
                   help="largest accepted |NDCG@10 difference| to PyTorch, a number such as 0.005 "
                        "(default: SHOPRANK_EXPORT_MAX_NDCG_DELTA, 0.005)")
    p.set_defaults(func=cmd_export)

    p = _command(sub, "mlflow-user", "MLflow accounts: add a person's read-only login (the admin creates it)",
                 "MLflow accounts for people: `add USERNAME` creates a read-only login, with the admin "
                 "account of stack.env / .env, and prints its password once.",
                 "shoprank mlflow-user add alice")
    p.add_argument("action", choices=["add"], help="add: create a read-only login")
    p.add_argument("username", help="the login name to create, e.g. alice")
    p.set_defaults(func=cmd_mlflow_user)

    p = _command(sub, "demo", "the whole story on the embedded stack (see README)",
                 "The whole story on the embedded stack: start it, generate a synthetic shop, train and "
                 "promote a ranker through Airflow, then simulate --days days of traffic, each followed by a "
                 "daily update. The stack is left running (shoprank stack down stops it).",
                 "shoprank demo", "shoprank demo --days 1 --products 800 --queries 300")
    p.add_argument("--days", type=int, default=3, metavar="N",
                   help="simulated days of traffic and daily updates, an integer")
    p.add_argument("--products", type=int, default=1500, metavar="N",
                   help="catalogue size of the synthetic shop, an integer")
    p.add_argument("--queries", type=int, default=600, metavar="N",
                   help="judged queries, an integer (default 600: a golden test split of ~120 queries, above "
                        "the gate's SHOPRANK_GATE_MIN_TEST_QUERIES=100)")
    p.set_defaults(func=cmd_demo)
    return parser


def _debug() -> bool:
    """SHOPRANK_DEBUG: full tracebacks (read without failing on a bad setting: that is what is reported)."""
    try:
        return get_settings().general.debug
    except ConfigError:
        return False


def cmd_mlflow_user(args: argparse.Namespace) -> int:
    from shoprank.mlflow_auth import main as mlflow_auth_main

    return mlflow_auth_main(["add-user", args.username])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from shoprank.mlflow_auth import export_credentials

        export_credentials()  # MLflow's client reads its login from os.environ only
        return args.func(args)
    except _user_errors() as exc:
        if _debug():
            raise
        print(f"shoprank: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
