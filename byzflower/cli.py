"""The ``byzflower`` command: fetch data, run experiments, print the config reference."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import sys
import tomllib
from pathlib import Path
from typing import Any

from byzflower.config import DEFAULTS, MAX_WORKERS, ConfigError, markdown_table, resolve
from byzflower.data import BUILT_IN, DATASETS, DataError, dataset_folder, ensure_dataset
from byzflower.records.results import RunFolderError

APP_DIR = Path(__file__).resolve().parent.parent


def parse_run_config(text: str | None) -> dict[str, Any]:
    """``key=value ...`` in TOML syntax, as ``flwr run --run-config`` takes it."""
    if not text or not text.strip():
        return {}
    try:
        return tomllib.loads("\n".join(shlex.split(text, posix=False)))
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError(
            f"cannot parse --run-config {text!r}: {exc}. Use TOML values with strings quoted, e.g. "
            "\"optimizer='saga' num-server-rounds=100\""
        ) from None


def _cmd_fetch(args: argparse.Namespace) -> int:
    names = list(DATASETS) if args.dataset == "all" else [args.dataset]
    for name in names:
        try:
            folder = ensure_dataset(name, args.data_dir, log=print)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{name}: verified in {folder}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.sync:
        from byzflower.config import sync_files

        for path in sync_files(Path(args.sync)):
            print(f"updated {path}")
        return 0
    if args.markdown:
        print(markdown_table())
    else:
        for k, v in DEFAULTS.items():
            print(f"{k} = {v!r}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    overrides = parse_run_config(args.run_config)
    cfg = resolve(overrides)  # fail fast, with every problem listed
    if args.supernodes < 0:
        raise ConfigError(f"--supernodes={args.supernodes} must be >= 1 (or 0 for the default, 2)")
    if args.supernodes > cfg.num_workers:
        raise ConfigError(
            f"--supernodes={args.supernodes} exceeds the run's {cfg.num_workers} workers: a SuperNode beyond them "
            f"would host none (use 1..{cfg.num_workers})"
        )
    if not 0 <= args.gpus_per_client < math.inf:
        raise ConfigError(f"--gpus-per-client={args.gpus_per_client} must be a finite share >= 0 (e.g. 0.1)")
    if args.cpus_per_client < 0:
        raise ConfigError(f"--cpus-per-client={args.cpus_per_client} must be >= 1 (or 0 for Flower's default, 2)")
    if args.engine == "local" and (args.supernodes or args.gpus_per_client or args.cpus_per_client):
        raise ConfigError("--supernodes / --gpus-per-client / --cpus-per-client need --engine flower or deployment")
    if args.insecure and args.engine != "deployment":
        raise ConfigError("--insecure is a deployment setting (the simulation's SuperLink listens on loopback only)")
    if args.engine == "deployment" and (args.gpus_per_client or args.cpus_per_client):
        raise ConfigError("--gpus-per-client / --cpus-per-client are simulation settings; not with --engine deployment")
    if args.ray_address is not None and args.engine != "flower":
        raise ConfigError(f"--ray-address is for --engine flower (Flower's simulation), not --engine {args.engine}")
    if args.ray_address is None and args.engine == "flower" and os.environ.get("RAY_ADDRESS", "local") != "local":
        args.ray_address = os.environ["RAY_ADDRESS"]  # Ray's own variable: Flower's simulation would join it
        print(f"joining the Ray cluster at $RAY_ADDRESS={args.ray_address!r} (unset it to start Ray for the run)")
    if args.ray_address is not None:
        from byzflower.ray_address import check_ray_option

        check_ray_option(args.ray_address)
    elif args.engine == "flower":
        _check_client_resources(args.cpus_per_client, args.gpus_per_client)
    dataset_folder(cfg["dataset"], cfg["data-dir"], log=print)
    from byzflower.factory import preflight

    preflight(cfg)  # data- and machine-dependent checks, before any folder or process exists
    if args.engine == "local":
        from byzflower.engine import run_local

        summary = run_local(cfg)
        return 0 if summary.get("status") == "finished" else 1
    from byzflower.flower.flower_runner import LocalDeployment, LocalSuperLink

    if not overrides.get("results-dir"):
        from byzflower.records.results import default_results_dir

        # The ServerApp runs in the SuperLink's working directory: give it an absolute path.
        overrides["results-dir"] = str(default_results_dir().resolve())
    federation: dict[str, Any] = {}
    if args.engine == "deployment":
        link: LocalSuperLink = LocalDeployment(args.supernodes or 2, insecure=args.insecure)
    else:
        link = LocalSuperLink(ray_address=args.ray_address)
        if args.supernodes:
            federation["num-supernodes"] = args.supernodes
        if args.gpus_per_client:
            federation["client-resources-num-gpus"] = args.gpus_per_client
        if args.cpus_per_client:
            federation["client-resources-num-cpus"] = args.cpus_per_client
    with link:
        outcome = link.run(APP_DIR, overrides, federation, echo=True)
    print(f"run {outcome.run_id}: {outcome.status}")
    return 0 if outcome.ok else 1


def _check_client_resources(cpus: int, gpus: float) -> None:
    """What Flower's own Ray (on this machine) can give each ClientApp; asked for more, the simulation
    crashes with 'ActorPool is empty' after its start-up (a cluster's resources are its own: not checked)."""
    have = os.cpu_count() or 1
    if cpus > have:
        raise ConfigError(f"--cpus-per-client={cpus} exceeds this machine's {have} CPU cores (use 1..{have})")
    if gpus > 0:
        import torch

        found = torch.cuda.device_count()
        if gpus > found:
            raise ConfigError(
                f"--gpus-per-client={gpus} but torch sees {found} GPU(s) on this machine"
                + ("" if found else ": leave it at 0 to compute on the CPU")
            )


def _cmd_credentials(args: argparse.Namespace) -> int:
    from byzflower.flower.credentials import CredentialsExist, make_credentials

    if not 1 <= args.supernodes <= MAX_WORKERS:
        raise ConfigError(f"--supernodes={args.supernodes} must be 1..{MAX_WORKERS} (one key pair per device)")
    try:
        c = make_credentials(args.folder, args.host, args.supernodes, replace=args.replace)
    except CredentialsExist as exc:
        raise ConfigError(str(exc)) from None
    except ValueError as exc:  # a host that no certificate can name
        raise ConfigError(f"--host: {exc}") from None
    print(f"CA certificate (to every device and the flwr CLI): {c.ca_cert}")
    print(f"SuperLink certificate and key: {c.server_cert}, {c.server_key}  (valid for {', '.join(args.host)})")
    for i, key in enumerate(c.node_keys):
        print(f"SuperNode {i}: private key {key} (to device {i} only), public key {c.node_public_key(i)} (register it)")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from byzflower.experiments.sweep import cell_config, grid, parse_axis, parse_seeds, run_sweep
    from byzflower.records.results import default_results_dir

    cells = grid(
        parse_axis("optimizer", args.optimizer),
        parse_axis("aggregator", args.aggregator),
        parse_axis("attack", args.attack),
        parse_seeds(args.seed) if args.seed is not None else None,
    )
    overrides = parse_run_config(args.run_config)
    set_here = ("optimizer", "aggregator", "attack", "run-name", "results-dir", *(("seed",) if args.seed else ()))
    for key in set_here:
        if key in overrides:
            flag = "--seed" if key == "seed" else "the sweep"
            raise ConfigError(f"--run-config may not set {key!r} in a sweep ({flag} sets it; use --out for the folder)")
    out = Path(args.out) if args.out else default_results_dir() / "sweep"
    # the data, fetched once before any worker starts: its keys from a cell's config (the run config
    # alone may be no valid run, e.g. num-byzantine=0 with the default attack where --attack none)
    for cell in cells:
        try:
            resolved = resolve(cell_config(cell, overrides, out))
        except ConfigError:
            continue  # run_sweep names every cell's problem at once
        dataset_folder(resolved["dataset"], resolved["data-dir"], log=print)
        break
    outcomes = run_sweep(
        cells,
        overrides,
        out,
        jobs=args.jobs,
        ray_address=args.ray_address,
        backend=args.backend,
        stop_grace=args.stop_grace,
    )
    if not args.no_report:
        from byzflower.experiments.report import write_report

        paths = write_report([out])
        print("report: " + ", ".join(str(p) for p in paths.values()))
    return 0 if all(o.get("status") == "finished" for o in outcomes) else 1


def _cmd_report(args: argparse.Namespace) -> int:
    from byzflower.experiments.report import write_report

    paths = write_report([Path(d) for d in args.dirs], Path(args.out) if args.out else None)
    print(paths["markdown"].read_text())
    if "worst" in paths:
        print(paths["worst"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="byzflower", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser("fetch", help="fetch and verify a data set into the data folder")
    fetch.add_argument(
        "dataset", nargs="?", default="mnist", choices=[*BUILT_IN, "all"], help="a data set, or all (the image sets)"
    )
    fetch.add_argument(
        "--data-dir", default=None, help="data folder (default: $BYZFLOWER_DATA_DIR or ~/.cache/byzflower)"
    )
    fetch.set_defaults(func=_cmd_fetch)

    config = sub.add_parser("config", help="print every run-config key and its default")
    config.add_argument("--markdown", action="store_true", help="as the README's Markdown table")
    config.add_argument("--sync", metavar="DIR", help="(developers) rewrite DIR's pyproject table and README table")
    config.set_defaults(func=_cmd_config)

    run = sub.add_parser("run", help="run one experiment (Flower's simulation engine, or in-process)")
    run.add_argument(
        "--engine",
        choices=("flower", "deployment", "local"),
        default="flower",
        help="flower: the Flower app in Flower's simulation engine through a local SuperLink; "
        "deployment: the Flower app on a real SuperLink and --supernodes real SuperNode processes on this "
        "machine; local: in this process, no Flower messaging",
    )
    run.add_argument("--run-config", default="", help="overrides, TOML syntax: \"optimizer='saga' lr=0.05\"")
    run.add_argument("--supernodes", type=int, default=0, help="number of SuperNodes (default 2)")
    run.add_argument("--gpus-per-client", type=float, default=0.0, help="GPU share per ClientApp (e.g. 0.1)")
    run.add_argument("--cpus-per-client", type=int, default=0, help="CPU cores per ClientApp (default: Flower's 2)")
    run.add_argument(
        "--ray-address",
        default=None,
        help="flower: run the simulation on this running Ray cluster (HOST:PORT, or auto) instead of starting "
        "Ray for the run",
    )
    run.add_argument(
        "--insecure",
        action="store_true",
        help="deployment: plain HTTP and no SuperNode authentication (a lab only; default: TLS + authentication)",
    )
    run.set_defaults(func=_cmd_run)

    creds = sub.add_parser("credentials", help="a CA, a SuperLink certificate and SuperNode keys for a deployment")
    creds.add_argument("folder", help="where to write them (private keys are mode 600)")
    creds.add_argument(
        "--host", action="append", required=True, help="the SuperLink's host name or IP address, as devices reach it"
    )
    creds.add_argument("--supernodes", type=int, required=True, help="how many SuperNode key pairs")
    creds.add_argument(
        "--replace",
        action="store_true",
        help="replace credentials already in the folder (every device set up with them is locked out)",
    )
    creds.set_defaults(func=_cmd_credentials)

    sweep = sub.add_parser("sweep", help="a grid of runs (in-process engine): optimizer x aggregator x attack (x seed)")
    sweep.add_argument("--optimizer", default="sgd,batch-sgd,saga", help="comma-separated optimizers, or all")
    sweep.add_argument("--aggregator", default="mean,gm", help="comma-separated aggregators, or all")
    sweep.add_argument(
        "--attack", default="none,gaussian,sign-flip,zero-gradient", help="comma-separated attacks, or all"
    )
    sweep.add_argument(
        "--seed",
        default=None,
        help="comma-separated seeds (e.g. 1,2,3): one run of every cell per seed, replicates that the report "
        "shows as mean ± std (default: the run config's seed, one run per cell)",
    )
    sweep.add_argument("--run-config", default="", help="overrides for every run, TOML syntax")
    sweep.add_argument(
        "--out", default=None, help="sweep folder (default: <results-dir>/sweep); reruns skip finished runs"
    )
    sweep.add_argument(
        "--jobs", type=int, default=1, help="runs at once (default 1: in this process); on a GPU they share it"
    )
    sweep.add_argument(
        "--backend",
        choices=("auto", "ray", "processes"),
        default="auto",
        help="how --jobs runs them: Ray, local processes, or auto (Ray with --ray-address, else processes)",
    )
    sweep.add_argument("--ray-address", default=None, help="a Ray cluster to spread runs over (e.g. 'auto')")
    sweep.add_argument(
        "--stop-grace",
        type=float,
        default=120.0,
        help="seconds a stopped sweep's runs have to record their interruption before they are killed",
    )
    sweep.add_argument("--no-report", action="store_true", help="skip writing the table and figure at the end")
    sweep.set_defaults(func=_cmd_sweep)

    report = sub.add_parser("report", help="paper-style table (Markdown + CSV) and figure from run folders")
    report.add_argument("dirs", nargs="+", help="folders holding run folders (searched recursively)")
    report.add_argument("--out", default=None, help="where to write (default: the first folder)")
    report.set_defaults(func=_cmd_report)
    return parser


_STOPPED_BY: list[str] = []  # the signals that stopped us (a library may re-raise a bare KeyboardInterrupt)


def _interrupt(signum: int, frame: object) -> None:
    _STOPPED_BY.append(f"stopped by {signal.Signals(signum).name}")
    raise KeyboardInterrupt(_STOPPED_BY[-1])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM and SIGHUP unwind like Ctrl-C: every process we started is stopped by the
    # context managers on the way out, and the run's summary says "interrupted". SIGINT gets the
    # handler too, even where it came in ignored (a background job of a script: `cmd &`), so that
    # SIGINT stops a run however it was started, and the processes we start inherit it as default.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (DataError, OSError, RunFolderError) as exc:  # OSError: a full disk, a folder gone, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        # Ray turns a signal handler's exception inside its blocking calls into a bare KeyboardInterrupt
        print(f"interrupted: {str(exc) or (_STOPPED_BY or ['Ctrl-C'])[0]}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
