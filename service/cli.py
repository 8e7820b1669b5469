"""The ``lethe`` command.

Bad input ends with a one-line ``lethe: error: ...`` message on stderr and exit status 2 (no
traceback); a run that did not reach its forgetting target exits with 3; a failed ``lethe pull --once``
with 4.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

EXIT_BAD_INPUT = 2
UNLEARN_HELP = "forget classes of a model package and write a new package"
EXIT_TARGET_MISSED = 3
EXIT_PULL_FAILED = 4  # lethe pull --once: the poll failed, the folder is as it was


def main(argv: list[str] | None = None) -> int:
    from service.config import SettingsError

    argv = sys.argv[1:] if argv is None else argv
    # The unlearn command's options come from the engine (torch, peft: ~6 s to import); the other
    # commands, `lethe pull` on every cron tick among them, do not pay for them.
    parser = build_parser(engine_options=not argv or argv[0] == "unlearn")
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except SettingsError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        print("lethe: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last resort: one line, never a traceback
        first_line = (str(exc).splitlines() or [""])[0]
        print(f"lethe: internal error: {type(exc).__name__}: {first_line}", file=sys.stderr)
        return 1


def build_parser(engine_options: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lethe", description="Make trained image classifiers forget classes.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if engine_options:
        add_unlearn_command(commands)
    else:
        commands.add_parser("unlearn", help=UNLEARN_HELP, add_help=False)
    add_service_commands(commands)
    return parser


def add_service_commands(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="run the API (uvicorn)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=_positive, default=1,
                       help="API processes (default: 1); in production, one per core of the API host")
    serve.set_defaults(handler=run_serve)

    worker = commands.add_parser("worker", help="run a Celery worker that processes deletion requests")
    worker.add_argument("--beat", action="store_true",
                        help="also run the periodic sweep, in a `lethe sweeper` process of its own beside the worker")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--loglevel", default=None, help="default: LETHE_LOG_LEVEL (INFO)")
    worker.set_defaults(handler=run_worker)

    sweeper = commands.add_parser("sweeper", help="run the periodic sweep (its scheduler and its own queue); "
                                  "run exactly one")
    sweeper.add_argument("--loglevel", default=None, help="default: LETHE_LOG_LEVEL (INFO)")
    sweeper.set_defaults(handler=run_sweeper)

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_commands.add_parser("upgrade", help="create or migrate the schema to the latest revision")
    upgrade.set_defaults(handler=run_db_upgrade)

    demo = commands.add_parser("demo", help="build a demo model, start API and worker, forget a digit end to end")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--forget", default="3", help="the digit to forget (default: %(default)s)")
    demo.add_argument("--exit-when-done", action="store_true", help="stop the services and exit after the request")
    demo.add_argument("--timeout", type=float, default=600, help="seconds to wait for the request")
    demo.set_defaults(handler=run_demo)

    keys = commands.add_parser("keys", help="API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = key_commands.add_parser("create", help="create a key; prints it as the last line (shown once)")
    create.add_argument("--name", required=True)
    create.add_argument("--scope", action="append", required=True,
                        help="requests:write, requests:read, models:read, models:write or admin; repeatable")
    create.set_defaults(handler=run_keys_create)
    revoke = key_commands.add_parser("revoke", help="revoke a key by name")
    revoke.add_argument("--name", required=True)
    revoke.set_defaults(handler=run_keys_revoke)
    from service.certificates.commands import add_commands as add_certificate_commands

    add_certificate_commands(commands, key_commands)

    audit = commands.add_parser("audit", help="the audit trail")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = audit_commands.add_parser("verify", help="walk every request's hash chain; exit 1 naming each break")
    verify.set_defaults(handler=run_audit_verify)

    pull = commands.add_parser(
        "pull", help="keep a folder at a model's current version and acknowledge it (an inference service's side)",
        description="Poll GET /models/current; put each new version in DIR/vN-<sha> with DIR/current swapped to "
                    "it atomically, delete the previous one, run --on-update and acknowledge the version as "
                    "--consumer. The API key comes from $LETHE_API_KEY (not the command line: ps shows it). "
                    f"Exit: 0 served, {EXIT_BAD_INPUT} bad input, {EXIT_PULL_FAILED} a poll failed with --once "
                    "(the folder is as it was).")
    pull.add_argument("--model", required=True)
    pull.add_argument("--into", required=True, metavar="DIR", help="the folder this command owns")
    pull.add_argument("--consumer", help="the consumer name registered for this service (omit: do not acknowledge)")
    pull.add_argument("--url", default=os.environ.get("LETHE_URL", "http://127.0.0.1:8000"),
                      help="the Lethe API (default: $LETHE_URL or %(default)s)")
    pull.add_argument("--every", type=float, default=30.0, metavar="SECONDS", help="poll interval (default: %(default)s)")
    pull.add_argument("--once", action="store_true", help="one poll, then exit (for cron)")
    pull.add_argument("--on-update", metavar="CMD",
                      help="a shell command run after each swap (LETHE_MODEL_DIR, LETHE_MODEL_VERSION, "
                           "LETHE_MODEL_SHA256 set); the version is acknowledged once it exits 0")
    pull.add_argument("--on-update-timeout", type=float, default=300.0, metavar="SECONDS",
                      help="--on-update is stopped after this and runs again on the next poll (default: %(default)s)")
    pull.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="per HTTP call (default: %(default)s)")
    pull.set_defaults(handler=run_pull)


def run_pull(args: argparse.Namespace) -> int:
    import signal

    from service.pull import Pull, PullError, Puller

    key = os.environ.get("LETHE_API_KEY", "").strip()
    if not key:
        return fail("set LETHE_API_KEY to the consumer's API key (models:read)")
    if args.every <= 0 or args.timeout <= 0 or args.on_update_timeout <= 0:
        return fail("--every, --timeout and --on-update-timeout must be positive")
    into = Path(args.into)
    if into.exists() and not into.is_dir():
        return fail(f"{into}: not a folder")
    puller = Puller(Pull(url=args.url, api_key=key, model=args.model, into=into, consumer=args.consumer,
                         on_update=args.on_update, on_update_timeout=args.on_update_timeout, timeout=args.timeout))
    if args.once:
        try:
            outcome = puller.once()
        except PullError as exc:
            print(f"lethe: error: {exc}", file=sys.stderr)
            return EXIT_PULL_FAILED
        print(f"lethe pull: {'now serving' if outcome.updated else 'serving'} {args.model} version {outcome.version} "
              f"(sha256 {outcome.sha256[:12]}…){', acknowledged' if outcome.acknowledged else ''}", file=sys.stderr)
        return 0
    logging.basicConfig(level=logging.INFO, format="lethe pull: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    puller.forever(args.every, stop=lambda: bool(stopping))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.config import get_settings
    from service.logs import configure_logging

    settings = get_settings()
    configure_logging(settings)
    # uvicorn's records go through our handler; the app logs one access line per request itself.
    # With several workers uvicorn starts fresh processes, which build the app (and its logging) themselves.
    # A TLS proxy's X-Forwarded-Proto makes the dashboard's cookies Secure, when it comes from a trusted proxy.
    uvicorn.run("service.cli:served_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_config=None, access_log=False, proxy_headers=True,
                forwarded_allow_ips=settings.forwarded_allow_ips)
    return 0


def served_app():
    """The app as one `lethe serve` process serves it: logging configured, then the app."""
    from service.app import create_app
    from service.config import get_settings
    from service.logs import configure_logging

    configure_logging(get_settings())
    return create_app()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def run_worker(args: argparse.Namespace) -> int:
    """The runs' worker, on the runs' queue only; with --beat, a `lethe sweeper` child beside it."""
    from service.config import get_unlearn_settings
    from service.queue import QUEUE

    get_unlearn_settings()  # a bad LETHE_UNLEARN_* stops the worker here, not each request it would run
    sweeper = None
    if args.beat:
        command = [sys.executable, "-m", "service.cli", "sweeper"] + (["--loglevel", args.loglevel] if args.loglevel else [])
        sweeper = subprocess.Popen(command)
    try:
        return start_celery_worker(args.loglevel, [f"--queues={QUEUE}", f"--concurrency={args.concurrency}"])
    finally:
        if sweeper is not None:
            sweeper.terminate()
            try:
                sweeper.wait(10)
            except subprocess.TimeoutExpired:
                sweeper.kill()


def run_sweeper(args: argparse.Namespace) -> int:
    """Celery beat and one process for the sweep's own queue: a run of minutes never delays a sweep."""
    from service.config import get_settings
    from service.queue import SWEEP_QUEUE

    schedule = get_settings().home / "celerybeat-schedule"
    # Its own node name: beside a worker on one host, two "celery@host" nodes would collide.
    return start_celery_worker(args.loglevel, [f"--queues={SWEEP_QUEUE}", "--concurrency=1", "--beat",
                                               f"--schedule={schedule}", "--hostname=sweeper@%h"])


def start_celery_worker(loglevel: str | None, options: list[str]) -> int:
    from service.config import get_settings
    from service.logs import configure_logging
    from worker.celery_app import celery_for, declare_queue

    settings = get_settings()
    configure_logging(settings, level=loglevel)  # Celery calls it again (setup_logging signal)
    settings.home.mkdir(parents=True, exist_ok=True)
    level = (loglevel or settings.log_level).upper()
    app = celery_for(settings.broker)
    declare_queue(app)
    app.worker_main(["worker", f"--loglevel={level}", "--pool=prefork", "--without-gossip", "--without-mingle",
                     *options])
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from service.demo import run_demo as demo

    return demo(args.host, args.port, args.forget, args.exit_when_done, args.timeout)


def run_db_upgrade(args: argparse.Namespace) -> int:
    from service.config import get_settings
    from service.db import upgrade_schema

    settings = get_settings()
    try:
        upgrade_schema(settings.database)
    except Exception as exc:  # a one-line message for any driver or migration error
        return fail(f"database upgrade failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    print(f"database at head: {redact(settings.database)}", file=sys.stderr)
    return 0


def run_audit_verify(args: argparse.Namespace) -> int:
    from service.config import get_settings
    from service.db import session_scope
    from service.deletion_requests.audit_chain import verify

    try:
        with session_scope(get_settings().database) as session:
            chains, events, breaks = verify(session)
    except Exception as exc:  # a one-line message for any driver error
        return fail(f"cannot read the audit trail: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    for found in breaks:
        print(f"broken: {found}")
    print(f"{chains} chain(s), {events} event(s): " + (f"{len(breaks)} break(s)" if breaks else "intact"),
          file=sys.stderr)
    return 1 if breaks else 0


def run_keys_create(args: argparse.Namespace) -> int:
    from service.auth.service import create_key
    from service.config import get_settings
    from service.db import session_scope
    from service.errors import ServiceError

    try:
        with session_scope(get_settings().database) as session:
            row, key = create_key(session=session, name=args.name, scopes=args.scope)
            scopes = ", ".join(row.scopes)
    except ServiceError as exc:
        return fail(exc.detail)
    print(f"created API key {args.name!r} with scopes {scopes}; it is shown only once:", file=sys.stderr)
    print(key)
    return 0


def run_keys_revoke(args: argparse.Namespace) -> int:
    from service.auth.service import revoke_key
    from service.config import get_settings
    from service.db import session_scope
    from service.errors import ServiceError

    try:
        with session_scope(get_settings().database) as session:
            revoke_key(session=session, name=args.name)
    except ServiceError as exc:
        return fail(exc.detail)
    print(f"revoked API key {args.name!r}", file=sys.stderr)
    return 0


def redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def add_unlearn_command(commands: argparse._SubParsersAction) -> None:
    from worker.engine.config import ADAPTER_BLOCKS, DEVICES, FEATURE_PROTOTYPES, PRECISIONS, UnlearnConfig
    from worker.engine.methods import METHODS

    defaults = UnlearnConfig()
    p = commands.add_parser(
        "unlearn", help=UNLEARN_HELP,
        description="Forget one or more classes of a model package (low-rank unlearning, no retain data) "
                    "and write the merged model as a new package with a JSON report.",
        epilog="A face model with few images of the person (benchmarks/README.md, 'Few images'): "
               "--method lora-kl --adapter-blocks later-half --targets qkv,proj,fc1,fc2 --lr 1e-3 --augment "
               "--max-forget-prob 0.05 --holdout-folds 3 --reset-head-rows (the service's few-image setting), and check the report's holdout figure (held-back images still recognised). "
               "Many images (hundreds per class): --method lora-kl --adapter-blocks later-half --reset-head-rows.",
    )
    p.add_argument("--model", required=True, metavar="PKG_DIR", help="model package folder (model.json + model.safetensors)")
    p.add_argument("--forget", required=True, action="append", metavar="CLASS=SOURCE",
                   help="a class to forget and its images (folder, .tar/.tar.gz, .csv/.jsonl manifest); repeatable")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="where to write the new package (must not exist or be empty)")
    p.add_argument("--eval", dest="eval_source", metavar="SOURCE",
                   help="labelled held-out validation images (label = parent folder or manifest 'label')")
    p.add_argument("--retain", dest="retain_source", metavar="SOURCE", help="labelled retain images (retain methods only)")
    p.add_argument("--anchor", dest="anchor_source", metavar="SOURCE",
                   help="unlabelled images of none of the model's classes (e.g. CIFAR-10 images for a face model): "
                        "the run holds the original's outputs on them in place; no retain data")
    p.add_argument("--anchor-weight", type=float, default=defaults.anchor_weight, help="default: %(default)s")
    p.add_argument("--method", default=defaults.method, choices=sorted(METHODS), help="default: %(default)s")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--max-steps", type=int, default=defaults.max_steps)
    p.add_argument("--target-forget-acc", type=float, default=defaults.target_forget_acc, metavar="PERCENT",
                   help="stop when every forget set's accuracy is at or below this (default: %(default)s)")
    p.add_argument("--lambda", dest="l1_weight", type=float, default=defaults.l1_weight, help="L1 weight (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's, 1e-2 with adapters)")
    p.add_argument("--rank", type=int, default=defaults.rank)
    p.add_argument("--targets", default=",".join(defaults.targets),
                   help="comma-separated layers that get adapters: last names (qkv,proj,fc1,fc2) in every block, or full names "
                        "(blocks.5.attn.qkv) (default: %(default)s)")
    p.add_argument("--adapter-blocks", default=defaults.adapter_blocks, choices=ADAPTER_BLOCKS,
                   help="later-half: only the targets in the later half of the blocks (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--augment", action="store_true",
                   help="train on a random view (crop, mirror, exposure) of each forget image at every step")
    p.add_argument("--confirm-views", type=int, default=defaults.confirm_views, metavar="N",
                   help="stop only when N fixed random views of each forget image are forgotten too (default: %(default)s)")
    p.add_argument("--max-forget-prob", type=float, default=defaults.max_forget_prob, metavar="P",
                   help="stop only when the class also has at most probability P on each forget image (default: %(default)s)")
    p.add_argument("--feature-weight", type=float, default=defaults.feature_weight, metavar="W",
                   help="pull each forget image's features toward the next class's prototype, synthesised from the "
                        "model alone (lora-kl/lora-adv; 0: off; benchmarks/README.md, the oracle table; default: %(default)s)")
    p.add_argument("--feature-tol", type=float, default=defaults.feature_tol, metavar="T",
                   help="with --feature-weight: stop only when that term is at most T of where it started "
                        "(default: %(default)s)")
    p.add_argument("--feature-prototypes", choices=FEATURE_PROTOTYPES, default=defaults.feature_prototypes,
                   help="with --feature-weight: each class's prototype from inputs synthesised from the model, or its "
                        "head row (no synthesis; on the digits, not on CIFAR-10; default: %(default)s)")
    p.add_argument("--head-template-cosine", type=float, default=defaults.head_template_cosine, metavar="C",
                   help="with --feature-prototypes head: go without the feature term when a forgotten class's head row "
                        "has a cosine below C with its forget images' mean feature (default: %(default)s)")
    p.add_argument("--target-temperature", type=float, default=defaults.target_temperature, metavar="T",
                   help="lora-kl/lora-adv: the forget images' target is the model's own distribution over the kept "
                        "classes at temperature T; below 1, sharper toward the class it ranks next (default: %(default)s)")
    p.add_argument("--synthetic-anchor", action="store_true",
                   help="without --anchor: hold the original's outputs on inputs synthesised from the model alone for "
                        "each class kept (no image of any class is used)")
    p.add_argument("--boundary-anchor", action="store_true",
                   help="with --synthetic-anchor: also hold inputs synthesised between each kept class and the kept "
                        "class the model ranks next (the kept classes' boundaries, not only their centres)")
    p.add_argument("--anchor-feature-weight", type=float, default=defaults.anchor_feature_weight, metavar="W",
                   help="also hold the anchor's pre-logit features where the original has them (0: outputs only; "
                        "default: %(default)s)")
    p.add_argument("--erase-weight", type=float, default=defaults.erase_weight, metavar="W",
                   help="with --eval-halves: erase each forgotten class's feature direction, trained on --eval's "
                        "selection half (NOT retain-free: images of every class; the audit half stays untouched; "
                        "0: off; benchmarks/README.md, the oracle table; default: %(default)s)")
    p.add_argument("--erase-tol", type=float, default=defaults.erase_tol, metavar="T",
                   help="with --erase-weight: stop only when each class's squared mean-feature gap to the kept classes' on "
                        "the selection half is at most T of the original's (default: %(default)s)")
    p.add_argument("--reset-head-rows", action="store_true",
                   help="after training, set each forgotten class's head row to the mean of the kept classes' rows "
                        "(classes forgotten by earlier versions too): the class's template leaves the weights, and "
                        "the forget-set target is judged on the network before the reset (the service does this)")
    p.add_argument("--holdout-folds", type=int, default=defaults.holdout_folds, metavar="K",
                   help="generalisation check: hold back each of K folds of the forget set in turn, forget the rest, "
                        "report how many held-back images are still recognised (0: off; default: %(default)s)")
    p.add_argument("--holdout-images", type=int, default=None, metavar="N",
                   help=f"with --holdout-folds: stop adding folds once N images of each class were held back "
                        f"(default: {defaults.holdout_images})")
    p.add_argument("--select-on-eval", action="store_true",
                   help="keep the checkpoint with the best (Acc_r + 100 - Acc_f)/2 on --eval that meets the target")
    p.add_argument("--eval-halves", action="store_true",
                   help="cut --eval in two by its images' sha256: select the checkpoint on one half, report on the "
                        "other (what the service does; without it the paper's set-up, one set for both)")
    p.add_argument("--evidence", action="store_true",
                   help="measure what the model still knows of each forgotten class on --eval (its audit half with "
                        "--eval-halves), original vs new: linear-probe accuracy, loss-based membership attack, "
                        "accuracy after 10-shot fine-tuning")
    p.add_argument("--eval-every", type=int, default=defaults.eval_every)
    p.add_argument("--patience", type=int, default=defaults.patience)
    p.add_argument("--skip-bad-images", action="store_true", help="skip and count undecodable files instead of failing")
    p.add_argument("--device", default=defaults.device, choices=DEVICES)
    p.add_argument("--precision", default=defaults.precision, choices=PRECISIONS)
    p.add_argument("--report", metavar="FILE", help="where to write the JSON report (default: OUT_DIR/report.json)")
    p.add_argument("--allow-miss", action="store_true",
                   help="write the model and exit 0 even when the forgetting target was not met")
    p.set_defaults(handler=run_unlearn)


def run_unlearn(args: argparse.Namespace) -> int:
    from worker.engine import EngineError, UnlearnConfig, UnlearnInputs, unlearn
    from worker.engine.package import check_output_folder

    try:
        inputs = UnlearnInputs(
            model=args.model, forget=tuple(parse_forget(item) for item in args.forget),
            eval_source=args.eval_source, retain_source=args.retain_source, anchor_source=args.anchor_source,
        )
        config = UnlearnConfig(
            method=args.method, seed=args.seed, lr=args.lr, l1_weight=args.l1_weight, rank=args.rank,
            targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()), adapter_blocks=args.adapter_blocks,
            batch_size=args.batch_size, max_steps=args.max_steps, target_forget_acc=args.target_forget_acc,
            select_on_eval=args.select_on_eval, eval_halves=args.eval_halves, evidence=args.evidence,
            eval_every=args.eval_every,
            patience=args.patience,
            skip_bad_images=args.skip_bad_images, device=args.device, precision=args.precision,
            augment=args.augment, confirm_views=args.confirm_views, anchor_weight=args.anchor_weight,
            max_forget_prob=args.max_forget_prob, feature_weight=args.feature_weight, feature_tol=args.feature_tol,
            feature_prototypes=args.feature_prototypes, target_temperature=args.target_temperature,
            head_template_cosine=args.head_template_cosine,
            synthetic_anchor=args.synthetic_anchor, boundary_anchor=args.boundary_anchor,
            anchor_feature_weight=args.anchor_feature_weight, reset_head_rows=args.reset_head_rows,
            erase_weight=args.erase_weight, erase_tol=args.erase_tol, holdout_folds=args.holdout_folds,
            **({"holdout_images": args.holdout_images} if args.holdout_images is not None else {}),
        )
        if args.holdout_images is not None and not args.holdout_folds:
            return fail("--holdout-images needs --holdout-folds (the generalisation check is off without it)")
        if config.holdout_folds:  # before training: the check cannot judge one photo, and the user asked for it
            from worker.engine.unlearn import forget_set_facts

            for cls, facts in forget_set_facts(inputs.model, inputs.forget).items():
                if (count := facts.distinct) < 2:
                    return fail(f"--holdout-folds: the forget set of {cls} holds {count} different photo(s); "
                                "the generalisation check needs at least 2 (3 or more give it a fair chance)")
        out = check_output_folder(args.out)  # before training: a run is minutes of work to lose
        report_path = report_location(args.report, out)
        bar = ProgressBar(sys.stderr)
        result = unlearn(inputs, config, on_progress=bar.update)
        bar.close()
        report = result.report.to_dict()
        if result.target_met or args.allow_miss:
            report["weights_sha256"] = result.save(str(out))
        elif not args.report:  # no model: keep OUT_DIR free for the next attempt
            report_path = out.with_name(out.name + ".report.json")
        write_json(report_path, report)
    except EngineError as exc:
        return fail(as_flags(str(exc)))
    except OSError as exc:
        return fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
    print(summary_line(report), file=sys.stderr)
    if not (result.target_met or args.allow_miss):
        worst = max(report["forget_acc_trained"].values())
        print(f"lethe: target not met: forget-set accuracy {worst:.1f}% > {config.target_forget_acc}% after "
              f"{report['steps_run']} steps; no model written (use --allow-miss to write it anyway)", file=sys.stderr)
        print(report_path)
        return EXIT_TARGET_MISSED
    print(report_path)
    return 0


def report_location(report: str | None, out: Path) -> Path:
    """Where the report goes: ``--report`` (never over an existing file) or OUT_DIR/report.json."""
    from worker.engine import ConfigError

    if report is None:
        return out / "report.json"
    path = Path(report)
    if path.exists():
        raise ConfigError(f"{path}: the report file exists already; choose another --report")
    return path


def parse_forget(item: str):
    from worker.engine import ConfigError, ForgetSpec

    name, sep, source = item.partition("=")
    if not sep or not name.strip() or not source.strip():
        raise ConfigError(f"--forget expects CLASS=SOURCE, got {item!r}")
    return ForgetSpec(class_name=name.strip(), source=source.strip())


def summary_line(report: dict) -> str:
    forget = ", ".join(f"{c} {report['forget_acc_before'][c]:.1f}% -> {a:.1f}%" for c, a in report["forget_acc_after"].items())
    line = f"forget-set accuracy: {forget}; {report['steps']} steps, {report['seconds']:.1f} s"
    if report["config"].get("reset_head_rows"):
        trained = ", ".join(f"{c} {a:.1f}%" for c, a in report["forget_acc_trained"].items())
        line += f" (head rows reset; before the reset: {trained})"
    term = report.get("feature_term")
    if term and not term["applied"]:
        cosines = ", ".join(f"{c} {x:.2f}" for c, x in term["head_row_cosine"].items())
        line += (f"; no feature term: the head's rows are not its classes' templates (row cosine {cosines} "
                 f"< {report['config']['head_template_cosine']})")
    if report.get("erasure"):
        gaps = ", ".join(f"{c} {g:.2f}" for c, g in report["erasure"]["gap"].items())
        line += f"; class-direction squared gap on {report['erasure']['images']} selection-half images: {gaps} of the original's"
    if report.get("evaluation"):
        e = report["evaluation"]
        trained = "" if e.get("acc_f_trained") is None else f" ({e['acc_f_trained']:.1f} before the reset)"
        line += (f"; held-out Acc_f {e['acc_f_before']:.1f} -> {e['acc_f_after']:.1f}{trained}, "
                 f"Acc_r {e['acc_r_before']:.1f} -> {e['acc_r_after']:.1f}")
    asked_margin = (report["config"].get("confirm_views") or report["config"].get("max_forget_prob", 1.0) < 1.0
                    or report["config"].get("erase_tol", 1.0) < 1.0)
    if asked_margin and report.get("target_met") and not report.get("stop_rule_met", True):
        line += "; the stop rule's margin (views, probability bound or erasure gap) was not reached within --max-steps"
    selection = report.get("selection")
    if selection and selection.get("best"):
        line += f"; checkpoint of step {selection['best']['step']} selected on the {selection['half']} split"
        if selection.get("selected_by") == "target":
            line += " (only forgot its images: no checkpoint reached the margin)"
    elif selection and report.get("steps_run") == 0:
        line += "; no checkpoint to select: the forget sets met the target before any step"
    elif selection:
        line += f"; no checkpoint selected on the {selection['half']} split (none forgot its images)"
    if report.get("holdout"):
        h = report["holdout"]
        held = ", ".join(f"{c} {a:.1f}% of {h['held_back'][c]}" if a is not None
                         else f"{c} not checkable (fewer than 2 different photos the model recognises)"
                         for c, a in h["forget_acc"].items())
        line += f"; held-back images still recognised: {held} ({h['folds_run']} of {h['folds']} folds)"
    for c, r in (report.get("residual_knowledge") or {}).items():
        line += f"; {c} probe {_pct(r['probe']['before'])} -> {_pct(r['probe']['after'])}, " \
                f"MIA {_pct(r['mia']['before'])} -> {_pct(r['mia']['after'])}, " \
                f"{r['relearn']['k']}-shot relearn {_pct(r['relearn']['before'])} -> {_pct(r['relearn']['after'])}"
    return line


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


CONFIG_FLAGS = {name: "--" + name.replace("_", "-") for name in (
    "confirm_views", "max_forget_prob", "anchor_weight", "anchor_feature_weight", "feature_weight", "feature_tol",
    "feature_prototypes", "target_temperature", "head_template_cosine",
    "synthetic_anchor", "boundary_anchor", "reset_head_rows", "holdout_folds",
    "holdout_images", "max_steps",
    "target_forget_acc", "eval_every", "patience", "adapter_blocks", "lr", "rank", "seed", "targets", "device",
    "precision", "select_on_eval", "eval_halves", "evidence", "erase_weight", "erase_tol")} | {"lambda (l1_weight)": "--lambda", "batch sizes": "--batch-size"}


def as_flags(message: str) -> str:
    """An engine message about a config field, in the flag's name (``confirm_views`` -> ``--confirm-views``)."""
    for name, flag in CONFIG_FLAGS.items():
        message = re.sub(rf"(?<![-\w]){re.escape(name)}(?!\w)", flag, message)
    return message


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def fail(message: str) -> int:
    print(f"lethe: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


class ProgressBar:
    """A one-line progress bar on a terminal (steps, loss, forget-set accuracy); plain lines otherwise."""

    def __init__(self, stream: TextIO, width: int = 24) -> None:
        self.stream, self.width = stream, width
        self.interactive = stream.isatty()
        self.started = time.perf_counter()
        self.drawn = False

    def update(self, progress) -> None:
        done = int(self.width * progress.step / progress.max_steps)
        accs = " ".join(f"{c}={a:.1f}%" for c, a in progress.forget_acc.items())
        text = (f"[{'#' * done}{'.' * (self.width - done)}] step {progress.step}/{progress.max_steps} "
                f"loss {progress.loss:.4g} forget acc {accs}{' (confirmed)' if progress.confirmed else ''} "
                f"{time.perf_counter() - self.started:.0f}s")
        if self.interactive:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn and self.interactive:
            self.stream.write("\n")
            self.stream.flush()


if __name__ == "__main__":
    sys.exit(main())
