"""The ``byzflower`` command: fetch data, run experiments, print the config reference."""

from __future__ import annotations

import argparse
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

from byzflower.config import DEFAULTS, ConfigError, markdown_table, resolve
from byzflower.data import DATASETS, DataError, ensure_dataset

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
    from byzflower.flower_runner import LocalSuperLink

    overrides = parse_run_config(args.run_config)
    cfg = resolve(overrides)  # fail fast, with every problem listed
    ensure_dataset(cfg["dataset"], cfg["data-dir"] or None, log=print)
    if not overrides.get("results-dir"):
        from byzflower.results import default_results_dir

        # The ServerApp runs in the SuperLink's working directory: give it an absolute path.
        overrides["results-dir"] = str(default_results_dir().resolve())
    federation: dict[str, Any] = {}
    if args.supernodes:
        federation["num-supernodes"] = args.supernodes
    if args.gpus_per_client:
        federation["client-resources-num-gpus"] = args.gpus_per_client
    if args.cpus_per_client:
        federation["client-resources-num-cpus"] = args.cpus_per_client
    with LocalSuperLink() as link:
        outcome = link.run(APP_DIR, overrides, federation, echo=True)
    print(f"run {outcome.run_id}: {outcome.status}")
    return 0 if outcome.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="byzflower", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser("fetch", help="fetch and verify a data set into the data folder")
    fetch.add_argument("dataset", nargs="?", default="mnist", choices=[*DATASETS, "all"])
    fetch.add_argument(
        "--data-dir", default=None, help="data folder (default: $BYZFLOWER_DATA_DIR or ~/.cache/byzflower)"
    )
    fetch.set_defaults(func=_cmd_fetch)

    config = sub.add_parser("config", help="print every run-config key and its default")
    config.add_argument("--markdown", action="store_true", help="as the README's Markdown table")
    config.add_argument("--sync", metavar="DIR", help="(developers) rewrite DIR's pyproject table and README table")
    config.set_defaults(func=_cmd_config)

    run = sub.add_parser("run", help="run one experiment through Flower's simulation engine")
    run.add_argument("--run-config", default="", help="overrides, TOML syntax: \"optimizer='saga' lr=0.05\"")
    run.add_argument("--supernodes", type=int, default=0, help="number of simulated SuperNodes (default: Flower's 2)")
    run.add_argument("--gpus-per-client", type=float, default=0.0, help="GPU share per ClientApp (e.g. 0.1)")
    run.add_argument("--cpus-per-client", type=int, default=0, help="CPU cores per ClientApp (default: Flower's 2)")
    run.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
