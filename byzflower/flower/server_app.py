"""The byzflower ServerApp: validate, discover nodes, run RobustSGD through the harness, record."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from logging import ERROR, INFO, WARNING

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from byzflower.config import ConfigError, RunConfig, attack_of, min_workers_of, resolve, rule_of
from byzflower.data import DataError
from byzflower.engine import open_run
from byzflower.factory import dataset_of, device_of, gradients_of, layout_of, preflight, recorder_of
from byzflower.flower.harness import Harness, HarnessError, StopRequest, poll
from byzflower.records.detection import shares_of
from byzflower.records.experiment import Recorder, ending_line, name_selected
from byzflower.records.results import RunDirectory, RunFolderError, status_of
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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


#: how long Flower's exit waits for a stopped run to record how it ended (the watchdog and
#: ``LocalSuperLink.stop`` give the processes 15 s before SIGKILL)
_RECORD_WAIT = 10.0


def _stop_request() -> tuple[StopRequest, threading.Event]:
    """(the run's stop request, an event set once the run has recorded how it ended or returned).

    A SuperLink stopped (or a run stopped) by SIGTERM must unwind the run, so that summary.json
    says so. In ``flwr-serverapp`` (deployment) the ServerApp has the main thread: a handler
    raises there. In ``flwr-simulation`` it runs in a thread, and the main thread ends the
    process: by Flower's exit (its signal handler, or the simulation's end), which calls exit
    handlers first, or by ``SystemExit`` (Ray's SIGTERM handler, which replaces Flower's once
    Ray starts), after which Python waits for the ServerApp's thread. Either way the stop is
    requested first, the harness sees it at its next poll, and the run records its end
    (without this, a stopped simulation left ``status: running`` behind).
    """
    stop, ended = StopRequest(), threading.Event()
    try:
        signal.signal(signal.SIGTERM, _interrupt)
        return stop, ended
    except ValueError:  # not the main thread
        pass
    reason = "stopped: Flower's simulation process is exiting (a signal, or its runtime ended)"

    def before_exit() -> None:  # Flower's: its forced exit starts after these handlers
        if not ended.is_set():
            stop.set(reason)
            if not ended.wait(_RECORD_WAIT):
                log(ERROR, "[byzflower] the run did not record its end within %.0f s of the exit", _RECORD_WAIT)

    def before_join() -> None:  # Python's, before it waits for the ServerApp's thread
        if not ended.is_set():
            stop.set(reason)

    from flwr.supercore.exit import add_exit_handler

    add_exit_handler(before_exit, run_before_force_exit=True)
    with contextlib.suppress(RuntimeError):  # (already shutting down)
        threading._register_atexit(before_join)  # concurrent.futures' hook too; Python >= 3.9
    return stop, ended


@app.main()
def main(grid: Grid, context: Context) -> None:
    stop, ended = _stop_request()
    try:
        _main(grid, context, stop)
    finally:
        ended.set()


def _main(grid: Grid, context: Context, stop: StopRequest) -> None:
    try:
        cfg = resolve(context.run_config)
        data = dataset_of(cfg)
        preflight(cfg)
        run, resume = _named_run(cfg)
        done = resume and _finished(run)
    except (ConfigError, DataError, RunFolderError) as exc:
        _abort(exc)
    if done:
        _say(f"already finished: {run.path}")
        run.unlock()
        return
    device = device_of(cfg)
    layout = layout_of(cfg)
    grads = gradients_of(cfg, data, device)
    recorder = recorder_of(cfg, data, grads, device, _say, run)
    status, error = "failed", None
    quiet = _QuietStrategyLoop()
    flwr_logger = logging.getLogger("flwr")
    harness = None
    try:  # the run folder exists from here on: whatever happens, summary.json says how it ended
        _say(f"results: {recorder.run.path}")
        if cfg["attack"] == "none" and cfg["num-byzantine"]:
            _say(f"attack='none': the {cfg['num-byzantine']} Byzantine workers are left out (W = {layout.num_workers})")
        harness = _harness(grid, cfg, stop)
        for warning in recorder.warnings:
            log(WARNING, "[byzflower] %s (running anyway: breakdown studies need it)", warning)
        strategy = RobustSGD(rule_of(cfg), lr=cfg.lr, device=device)
        rounds = int(cfg["num-server-rounds"])
        x0 = grads.initial_point()
        if resume:
            x0 = _resume(recorder, strategy) if (recorder.run.path / CHECKPOINT).exists() else x0
            if strategy.round_offset == 0:
                recorder.run.truncate_records(after=-1)  # killed before its first checkpoint: start over
        evaluate = _evaluation(cfg, recorder, strategy, harness, grads, rounds)
        recorder.begin(strategy.round_offset + 1)
        harness.discover()
        recorder.warnings += [f"refused SuperNode {r['node']}: {r['reason']}" for r in harness.refused]
        _say(
            f"{layout.num_workers} workers ({cfg['num-honest']} honest, {layout.num_byzantine} Byzantine) on "
            f"{len(harness.nodes)} SuperNodes; optimizer={cfg['optimizer']} aggregator={cfg['aggregator']} "
            f"attack={cfg['attack']} lr={cfg.lr} batch-size={cfg.batch_size}"
        )
        flwr_logger.addFilter(quiet)
        initial = ArrayRecord({n: Array(t.detach().cpu().numpy()) for n, t in grads.unflatten(x0).items()})
        left = rounds - strategy.round_offset
        strategy.start(grid=harness, initial_arrays=initial, num_rounds=left, evaluate_fn=evaluate)
        (recorder.run.path / CHECKPOINT).unlink(missing_ok=True)
        status = "finished"
    except (HarnessError, RunFolderError) as exc:  # our own message alone (a checkpoint it cannot put back)
        error = str(exc) if isinstance(exc, HarnessError) else status_of(exc)[1]
        _finish(recorder, status, error, harness, grid, stop, bool(cfg["run-name"]))
        _abort(exc)
    except BaseException as exc:
        status, error = status_of(exc)
        raise
    finally:
        flwr_logger.removeFilter(quiet)
        if not recorder.finished:
            _finish(recorder, status, error, harness, grid, stop, bool(cfg["run-name"]))


def _finished(run: RunDirectory) -> bool:
    """Whether the named run's folder holds a finished run (a damaged summary: said, the folder unlocked)."""
    with run.unlocked_on_error():
        return (run.summary() or {}).get("status") == "finished"


def _named_run(cfg: RunConfig) -> tuple[RunDirectory | None, bool]:
    """A named run's folder (locked) and whether it holds a run to resume; (None, False) for an
    unnamed run, whose folder the recorder creates."""
    if not cfg["run-name"]:
        return None, False
    return open_run(cfg)


def _harness(grid: Grid, cfg: RunConfig, stop: StopRequest) -> Harness:
    """The message exchange of the run: the server assigns workers to nodes and checks replies."""
    attack = attack_of(cfg)
    return Harness(
        grid,
        layout_of(cfg),
        int(cfg["seed"]),
        omniscient=attack is not None and attack.omniscient,
        share_messages=attack is not None and attack.needs_messages,
        timeout=float(cfg["round-timeout"]),
        min_workers=min_workers_of(cfg),
        log=lambda line: log(WARNING, "[byzflower] %s", line),
        stop=stop,
    )


def _finish(
    recorder: Recorder,
    status: str,
    error: str | None,
    harness: Harness | None,
    grid: Grid,
    stop: StopRequest,
    named: bool,
) -> None:
    """Record how the run ended; then the nodes drop its worker state, unless it was interrupted:
    a named run resumes from that state (each node keeps its last checkpoints'), so it stays; an
    unnamed one is asked to drop it for a short while (a node stopped with the run cannot answer);
    in a simulation that is exiting, the state goes with the SuperLink's home."""
    if harness is not None:  # refusals seen later (a stray node during the run) are reported too
        seen = set(recorder.warnings)
        recorder.warnings += [
            w for w in (f"refused SuperNode {r['node']}: {r['reason']}" for r in harness.refused) if w not in seen
        ]
    try:
        summary = recorder.finish(status, error)
    finally:  # (even where the summary could not be written)
        if stop.is_set():  # the simulation is exiting: its nodes' state goes with the SuperLink's home
            pass
        elif status != "interrupted":
            _cleanup(grid, 60.0)
        elif named:
            _say("interrupted: the nodes keep the workers' state for the run's resumption")
        else:
            _cleanup(grid, 5.0)
    _say(ending_line(status, summary, recorder.run.path))


CHECKPOINT = "server-checkpoint.pt"


def _resume(recorder: Recorder, strategy: RobustSGD) -> torch.Tensor:
    """Load the server's checkpoint: the model, the rule's state, the recorder; returns the model.

    The nodes of the new Flower run start without worker state, so the first round rebuilds it at
    this model (SAGA's table, SVRG's snapshot, SARAH's estimate): a resumed run with a stateless
    estimator (SGD, mini-batch SGD) gives the uninterrupted run's numbers, the others do not."""
    state = recorder.run.load_torch(CHECKPOINT)
    with recorder.run.restoring(CHECKPOINT):
        t = int(state["iteration"])
        strategy.rule.load_state_dict(state["rule"])
        recorder.load_state_dict(state["recorder"])
        x = state["x"]
    recorder.run.truncate_records(after=t)  # records written after the checkpoint are recomputed
    strategy.round_offset = t
    recorder.resumed(t + 1)
    _say("the nodes put back their workers' state of the checkpoint; any that kept none say so (rebuilt_workers)")
    return x


def _checkpoint(recorder: Recorder, strategy: RobustSGD, t: int) -> None:
    state = {
        "iteration": t,
        "x": strategy._point.detach().cpu().clone(),
        "rule": strategy.rule.state_dict(),
        "recorder": recorder.state_dict(),
    }
    recorder.run.save_torch(CHECKPOINT, state)


def _evaluation(cfg, recorder: Recorder, strategy: RobustSGD, harness: Harness, grads, rounds: int):
    """The ``evaluate_fn`` of Flower's round loop: record the round, evaluate when due, checkpoint."""
    every = int(cfg["checkpoint-every"]) if cfg["run-name"] else 0

    def evaluate(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = flower_round + strategy.round_offset
        if flower_round == 0 and strategy.round_offset:
            return None  # a resumed run: its start was evaluated before the interruption
        if server_round > 0:
            metrics = dict(strategy.last_metrics or {})
            rec = harness.last_round
            info = {k[5:]: v for k, v in metrics.items() if k.startswith("rule-")}
            counts = {k: v for k, v in metrics.items() if k.startswith(("dropped-", "failed"))}
            shares = {}
            if rec is not None:
                name_selected(info, strategy.last_valid, rec.order, rec.byzantine_ids)
                if not counts.get("failed"):
                    shares = shares_of(strategy.last_weights, strategy.last_valid, rec.order)
                counts["missing-messages"] = len(rec.missing)
                counts.update({f"rejected-{k}": v for k, v in rec.rejected.items()})
            recorder.observe(
                server_round,
                None if rec is None else rec.honest,
                strategy.last_aggregate,
                counts,
                info,
                missing=None if rec is None else rec.missing,
                shares=shares,
                rebuilt=None if rec is None else rec.rebuilt,
            )
        record = None
        if recorder.due(server_round):
            x = grads.flatten(
                {k: torch.from_numpy(a) for k, a in zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True)}
            )
            record = recorder.evaluate(server_round, x)
            if server_round == rounds:
                recorder.run.save_model(grads.unflatten(x))
        if every and server_round % every == 0 and 0 < server_round < rounds:
            _checkpoint(recorder, strategy, server_round)  # after the evaluation, as the local engine does
        if record is None:
            return None
        return MetricRecord(
            {k: float(v) for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        )

    return evaluate


def _abort(exc: Exception) -> None:
    """Fail the run with our message alone: Flower logs the exception, and the frames between
    Flower's runner and this line would only hide the message."""
    sys.tracebacklimit = 0  # this process exists for this one run
    raise exc.with_traceback(None) from None


def _cleanup(grid: Grid, timeout: float) -> None:
    """Ask every node to delete this run's worker state (best effort, for up to ``timeout`` s)."""
    try:
        msgs = [
            Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query.cleanup")
            for n in grid.get_node_ids()
        ]
        poll(grid, msgs, timeout)
    except Exception as exc:  # the run's outcome is already recorded; cleanup must not mask it
        log(ERROR, "[byzflower] cleanup failed: %s", exc)
