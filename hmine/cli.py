"""The ``hmine`` command line.

Heavy packages (torch, diffusers, prefect) are imported inside the subcommands, so
``hmine --help`` and config errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from hmine.runtime import configure_environment


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML run config")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set sample.n_samples=64 (repeatable)",
    )
    parser.add_argument(
        "--no-prefect",
        action="store_true",
        help="run the plain stage functions without Prefect (no local server start-up)",
    )


def _add_dask_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dask",
        metavar="ADDRESS",
        default=None,
        help="run the sample, label, jacobian and edit stages in shards on a Dask cluster, and the directions "
        "stage's out-of-core PCA on its workers: the scheduler at ADDRESS (e.g. tcp://host:8786), "
        "or 'local' for a LocalCluster of runner.n_workers processes (same as runner.kind: dask)",
    )


# the stages that run on a Dask cluster with runner.kind: dask (hmine.sharding's, and the
# directions stage's PCA); listed here, not imported, to keep `hmine --help` fast
DASK_STAGES = {"sample", "label", "jacobian", "edit", "directions"}


def dask_overrides(address: str | None) -> list[str]:
    """The config overrides that ``--dask ADDRESS`` stands for."""
    if address is None:
        return []
    if address == "local":
        return ["runner.kind=dask", "runner.address=null"]
    return ["runner.kind=dask", f"runner.address={json.dumps(address)}"]  # quoted: YAML reads host:port oddly


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmine", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run every stage of a config, resuming what exists")
    _add_config_args(p)
    _add_dask_arg(p)
    from hmine.stages import stages

    for stage in stages():
        p = sub.add_parser(stage.name, help=stage.summary)
        _add_config_args(p)
        if stage.name in DASK_STAGES:
            _add_dask_arg(p)

    p = sub.add_parser(
        "deploy",
        help="run a config on a schedule: a Prefect deployment served by this process (needs PREFECT_API_URL)",
    )
    p.add_argument("config", type=Path, help="YAML run config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value for every scheduled run (repeatable)")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='a cron schedule, e.g. "0 2 * * *" (every night at 02:00)')
    when.add_argument("--interval", type=float, metavar="SECONDS", help="a run every SECONDS seconds")
    p.add_argument("--name", default=None, help="the deployment's name (default: the run's name)")

    p = sub.add_parser("status", help="per stage: complete / partial / missing / stale")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--config", type=Path, default=None, help="current config, to detect stale stages")

    p = sub.add_parser("train-embedded", help="train (or resume) the embedded shapes-world models")
    p.add_argument("what", choices=["ddpm", "classifier"])
    p.add_argument("config", type=Path, help="training config YAML (configs/embedded-ddpm.yaml or configs/embedded-classifier.yaml)")
    p.add_argument("--work-dir", type=Path, required=True, help="checkpoints, logs and grids")
    p.add_argument("--export-dir", type=Path, default=None, help="write the final model here")
    p.add_argument("--until-step", type=int, default=None, help="stop (with a checkpoint) at this step")
    return parser


def _check_cluster_server(args, config, stages) -> None:
    """A cluster that outlives this command needs a Prefect server that does too.

    Without ``PREFECT_API_URL`` hmine starts a temporary server that exits with the command.
    The workers of an existing cluster (``runner.address``) keep the address of the first
    server they report to, so the next command's shards fail on them (measured: ``hmine
    label --dask ADDRESS`` after ``hmine sample --dask ADDRESS`` could not acquire its
    concurrency slots from the sample command's exited server).
    """
    if args.no_prefect or config.runner.kind != "dask" or not config.runner.address:
        return
    if set(stages) & DASK_STAGES and not os.environ.get("PREFECT_API_URL"):
        raise ValueError(
            f"runner.address {config.runner.address} is a Dask cluster that outlives this command, but "
            "PREFECT_API_URL is not set, so its workers would keep reporting to this command's temporary "
            "Prefect server after it exits; start one (prefect server start), export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api to the workers and to hmine, or use --dask local"
        )


def _run_stages(args, stages) -> int:
    from hmine.config import load_config
    from hmine.pipeline import prepare_run, run_stages
    from hmine.preflight import check_run_inputs
    from hmine.runtime import RunLock, exit_cleanly_on_signals

    dask = getattr(args, "dask", None)
    if dask is not None and args.no_prefect:
        raise ValueError("--dask runs stages as Prefect tasks on the cluster; drop --no-prefect")
    config = load_config(args.config, [*args.overrides, *dask_overrides(dask)])
    if stages is None:
        from hmine.stages import applicable_stage_names

        stages = applicable_stage_names(config)
    if args.no_prefect and config.runner.kind == "dask" and set(stages) & DASK_STAGES:
        logging.getLogger("hmine").warning("--no-prefect: runner.kind dask is ignored, every stage runs here")
    check_run_inputs(config, stages)  # bad input is refused before the run directory is touched
    _check_cluster_server(args, config, stages)
    exit_cleanly_on_signals()
    created = _first_missing_folder(config.run_dir)  # the folders this command will create
    try:
        with RunLock(config.run_dir):
            config = prepare_run(config)  # pins hub revisions; refuses other samples before anything is written
            if not args.no_prefect and not os.environ.get("PREFECT_API_URL"):
                from hmine.runtime import start_prefect_server

                start_prefect_server()
            if args.no_prefect:
                results = run_stages(config, stages)
            else:
                from flows.stages import run_pipeline  # the library never imports flows

                results = run_pipeline(config, stages)
    except BaseException:
        if created is not None:
            _remove_if_untouched(config.run_dir, created)
        raise
    for stage, result in results.items():
        print(f"{stage}: {result}")
    return 0


# What a run directory holds before any stage has written to it.
_RUN_DIR_BOOKKEEPING = {".lock", "config.json", "config.json.tmp", "run_log.jsonl", "pins.json", "pins.json.tmp"}


def _first_missing_folder(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet, or None."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def _remove_if_untouched(run_dir: Path, created: Path) -> None:
    """Remove a run directory this command created, and the empty folders it made for it,
    if no stage wrote into it.

    A refusal after the lock (an offline hub id, weights that cannot be loaded) must not
    leave a run directory that looks like a run.
    """
    try:
        entries = set(os.listdir(run_dir))
        if entries <= _RUN_DIR_BOOKKEEPING:
            for name in entries:
                (run_dir / name).unlink()
            folder = run_dir.absolute()
            while True:
                folder.rmdir()  # fails (and stops) at a folder that is not empty
                if folder == created:
                    break
                folder = folder.parent
    except OSError:
        pass  # best effort: the error being raised is the one to report


def _deploy(args) -> int:
    from hmine.config import load_config
    from hmine.preflight import check_run_inputs
    from hmine.stages import applicable_stage_names

    if not os.environ.get("PREFECT_API_URL"):
        raise ValueError(
            "hmine deploy needs a Prefect server that keeps the schedule and runs its scheduler: "
            "start one (prefect server start) and export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    if args.interval is not None and args.interval <= 0:
        raise ValueError(f"--interval must be a positive number of seconds, got {args.interval:g}")
    config = load_config(args.config, args.overrides)
    check_run_inputs(config, applicable_stage_names(config))  # bad input: refused now
    from flows.deploy import serve_config  # the library never imports flows

    serve_config(args.config, args.overrides, cron=args.cron, interval=args.interval, name=args.name)
    return 0


def _status(args) -> int:
    from hmine.config import load_config
    from hmine.pipeline import stage_status

    if not args.run_dir.exists():
        print(f"error: run directory {args.run_dir} does not exist", file=sys.stderr)
        return 2
    if not args.run_dir.is_dir():  # e.g. `hmine status configs/demo.yaml`: every stage would read 'missing'
        print(
            f"error: {args.run_dir} is a file, not a run directory: pass the run's directory "
            f"(e.g. stores/<name>), and the config with --config {args.run_dir} to detect stale stages",
            file=sys.stderr,
        )
        return 2
    config = load_config(args.config) if args.config else None
    for status in stage_status(args.run_dir, config):
        print(status.line())
    return 0


def _train_embedded(args) -> int:
    import yaml

    settings = yaml.safe_load(args.config.read_text()) or {}
    if args.what == "ddpm":
        from hmine.world.ddpm import DDPMTrainConfig, train_ddpm

        train_ddpm(DDPMTrainConfig(**settings), args.work_dir, export_dir=args.export_dir, until_step=args.until_step)
    else:
        from hmine.world.classifier import ClassifierTrainConfig, train_classifier

        train_classifier(ClassifierTrainConfig(**settings), args.work_dir, export_dir=args.export_dir, until_step=args.until_step)
    return 0


def main(argv: list[str] | None = None) -> int:
    configure_environment()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("hmine").setLevel(logging.INFO)
        # When one of zarr's concurrent chunk writes fails (a full disk), the error reaches us
        # as an exception, reported in one line below, and asyncio logs it again, traceback
        # and all, for each sibling future collected unretrieved. --verbose shows them.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    from hmine.config import ConfigError
    from hmine.runtime import Interrupted, RunLocked
    from hmine.stores import StoreConfigMismatch

    try:
        from hmine.stages import stage_names

        if args.command == "run":
            return _run_stages(args, None)  # the stages the config asks for
        if args.command in stage_names():
            return _run_stages(args, (args.command,))
        if args.command == "deploy":
            return _deploy(args)
        if args.command == "status":
            return _status(args)
        if args.command == "train-embedded":
            return _train_embedded(args)
    except (ConfigError, RunLocked, StoreConfigMismatch, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Interrupted as interrupted:
        print(f"error: {interrupted}", file=sys.stderr)
        return interrupted.exit_code
    except KeyboardInterrupt:  # before the handlers were installed
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
