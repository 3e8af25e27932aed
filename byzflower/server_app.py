"""The byzflower ServerApp: validate, discover nodes, run RobustSGD through the harness, record."""

from __future__ import annotations

import logging
import sys
from logging import ERROR, INFO, WARNING

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from byzflower.config import ConfigError, attack_of, resolve, rule_of, warnings_of
from byzflower.data import DataError
from byzflower.experiment import Evaluator, Recorder, name_selected
from byzflower.factory import dataset_of, device_of, gradients_of, layout_of, preflight
from byzflower.harness import Harness, HarnessError, _poll
from strategies.strategy import RobustSGD

app = ServerApp()


class _QuietStrategyLoop(logging.Filter):
    """Drop the per-round INFO lines of Flower's Strategy.start (we print one line per evaluation)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/flwr/serverapp/strategy/" not in record.pathname.replace(
            "\\", "/"
        )


def _say(message: str) -> None:
    log(INFO, "[byzflower] %s", message)


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = resolve(context.run_config)
        data = dataset_of(cfg)
        preflight(cfg)
    except (ConfigError, DataError) as exc:
        _abort(exc)

    device = device_of(cfg)
    layout = layout_of(cfg)
    grads = gradients_of(cfg, data, device)
    recorder = Recorder(cfg, Evaluator(cfg, data, grads, device), _say)
    recorder.byzantine_ids = list(layout.byzantine_ids)
    _say(f"results: {recorder.run.path}")
    if cfg["attack"] == "none" and cfg["num-byzantine"]:
        _say(f"attack='none': the {cfg['num-byzantine']} Byzantine workers are left out (W = {layout.num_workers})")

    attack = attack_of(cfg)
    harness = Harness(grid, layout, int(cfg["seed"]), omniscient=attack is not None and attack.omniscient)
    recorder.warnings = warnings_of(cfg)
    for warning in recorder.warnings:
        log(WARNING, "[byzflower] %s (running anyway: breakdown studies need it)", warning)
    strategy = RobustSGD(rule_of(cfg), lr=cfg.lr, device=device)
    rounds = int(cfg["num-server-rounds"])

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:
            metrics = dict(strategy.last_metrics or {})
            rec = harness.last_round
            info = {k[5:]: v for k, v in metrics.items() if k.startswith("rule-")}
            if rec is not None:
                name_selected(info, strategy.last_valid, rec.order, rec.byzantine_ids)
            recorder.observe(
                server_round,
                None if rec is None else rec.honest,
                strategy.last_aggregate,
                {k: v for k, v in metrics.items() if k.startswith(("dropped-", "failed"))},
                info,
            )
        if not recorder.due(server_round):
            return None
        x = grads.flatten(
            {k: torch.from_numpy(a) for k, a in zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True)}
        )
        record = recorder.evaluate(server_round, x)
        if server_round == rounds:
            recorder.run.save_model(grads.unflatten(x))
        return MetricRecord(
            {k: float(v) for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        )

    quiet = _QuietStrategyLoop()
    flwr_logger = logging.getLogger("flwr")
    status, error = "failed", None
    try:
        harness.discover()
        _say(
            f"{layout.num_workers} workers ({cfg['num-honest']} honest, {layout.num_byzantine} Byzantine) on "
            f"{len(harness.nodes)} SuperNodes; optimizer={cfg['optimizer']} aggregator={cfg['aggregator']} "
            f"attack={cfg['attack']} lr={cfg.lr} batch-size={cfg.batch_size}"
        )
        flwr_logger.addFilter(quiet)
        initial = ArrayRecord(
            {n: Array(t.detach().cpu().numpy()) for n, t in grads.unflatten(grads.initial_point()).items()}
        )
        strategy.start(grid=harness, initial_arrays=initial, num_rounds=rounds, evaluate_fn=evaluate)
        status = "finished"
    except HarnessError as exc:
        error = str(exc)
        _abort(exc)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        flwr_logger.removeFilter(quiet)
        summary = recorder.finish(status, error)
        _cleanup(grid)
        _say(f"{status}: final test accuracy {summary['final'].get('test_accuracy')}; results in {recorder.run.path}")


def _abort(exc: Exception) -> None:
    """Fail the run with our message alone: Flower logs the exception, and the frames between
    Flower's runner and this line would only hide the message."""
    sys.tracebacklimit = 0  # this process exists for this one run
    raise exc.with_traceback(None) from None


def _cleanup(grid: Grid) -> None:
    """Ask every node to delete this run's worker state (best effort)."""
    try:
        msgs = [
            Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query.cleanup")
            for n in grid.get_node_ids()
        ]
        _poll(grid, msgs, 60.0)
    except Exception as exc:  # the run's outcome is already recorded; cleanup must not mask it
        log(ERROR, "[byzflower] cleanup failed: %s", exc)
