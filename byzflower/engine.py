"""The in-process engine: the same experiment as the Flower app, without Flower messaging.

It calls the very same objects — the honest estimator (one group holding every honest worker,
state as stacked tensors), the attack, the aggregation rule, the role-blind order, the recorder —
so for the same config and seed it produces the Flower engine's numbers (to float tolerance:
only the server process's BLAS threads may order some sums differently). It checkpoints every
``checkpoint-every`` iterations and, started again on the same run folder, resumes from the last
checkpoint and ends with the numbers of an uninterrupted run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from byzflower.config import RunConfig, rule_of
from byzflower.core import role_blind_positions
from byzflower.factory import dataset_of, device_of, gradients_of, layout_of, preflight, recorder_of
from byzflower.records.detection import shares_of
from byzflower.records.experiment import ending_line, name_selected
from byzflower.records.results import (
    RunDirectory,
    RunFolderError,
    config_difference,
    default_results_dir,
    record_failure,
    run_name,
    status_of,
)
from byzflower.workers import HostedWorkers
from clients.attacks import HonestStats
from strategies.aggregators import finite_rows
from strategies.step import server_step, speculative_step

Log = Callable[[str], None]
CHECKPOINT = "checkpoint.pt"
# a speculative round's counts: a segment is kept only if all its rounds were clean
_CLEAN = ("dropped-nonfinite", "dropped-malformed", "dropped-error", "missing-messages", "failed")
# iterations whose role-blind positions are made on the host and sent to the device at once
_BLOCK = 256


class RunExists(RunFolderError):
    """The run folder exists with a different config."""


def open_run(cfg: RunConfig) -> tuple[RunDirectory, bool]:
    """The run's folder (locked by this process), and whether it holds an unfinished run to resume.

    A named run (``run-name``) with the same config continues where its checkpoint left it; a
    finished one is left alone by the caller; an unnamed run always gets a new folder. A named
    folder that holds no run yet (a sweep's record of a run that failed before it began) is this
    run's: it was given a new name (``name-2``, ``-3``, ... at every attempt) that the sweep never read.
    """
    root = Path(cfg["results-dir"] or default_results_dir()).expanduser().resolve()
    if cfg["run-name"]:
        path = root / cfg["run-name"]
        if path.is_dir() and not (path / "config.json").exists():
            stray = sorted(p.name for p in path.iterdir() if p.name not in (RunDirectory.LOCK, "summary.json"))
            if stray:  # not ours to write in: nothing is written there
                shown = ", ".join(stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
                raise RunFolderError(
                    f"{path} holds {shown} but no run (no config.json); choose another run-name or move it away"
                )
            run = RunDirectory(path)
            run.lock()
            with run.unlocked_on_error():
                if not (path / "config.json").exists():  # still none with the lock held: no other process makes it
                    (path / "summary.json").unlink(missing_ok=True)  # the failed attempt's; this run writes its own
                    run.write_json("config.json", cfg.resolved())
                    return run, False
            run.unlock()
        if (path / "config.json").exists():
            run = RunDirectory(path)
            run.lock()
            with run.unlocked_on_error():
                shown = config_difference(run.config(), cfg.resolved())
                if shown:
                    raise RunExists(
                        f"run-name={cfg['run-name']!r} already holds a run with another config, differing in "
                        f"{shown}; choose another run-name or remove the folder"
                    )
            return run, True
    return RunDirectory.create(root, cfg["run-name"] or run_name(cfg.resolved()), cfg.resolved()), False


class LocalRun:
    """One experiment in this process. ``run()`` executes it (resuming when a checkpoint exists)."""

    def __init__(self, cfg: RunConfig, run: RunDirectory | None = None, log: Log = print) -> None:
        self.cfg = cfg
        self.log = log
        preflight(cfg)
        resume = False
        if run is None:
            run, resume = open_run(cfg)
        self.run_dir = run
        #: a named run's summary when it already finished: nothing is built, its folder stays as it is
        self.done: dict[str, Any] | None = None
        if resume:
            with run.unlocked_on_error():  # damaged: said in one line, the folder left for the user to look at
                existing = run.summary()
            if existing is not None and existing.get("status") == "finished":
                self.done = existing
                return
        try:
            self._build(cfg, run, resume)
        except BaseException as exc:  # the folder exists: it must say why nothing ran
            record_failure(run, cfg.resolved(), exc)
            run.unlock()
            raise

    def _build(self, cfg: RunConfig, run: RunDirectory, resume: bool) -> None:
        log = self.log
        self.device = device_of(cfg)
        data = dataset_of(cfg)
        self.layout = layout_of(cfg)
        self.grads = gradients_of(cfg, data, self.device)
        honest_ids = list(self.layout.honest_ids)
        self.byzantine_ids = list(self.layout.byzantine_ids)
        self.workers = HostedWorkers(
            cfg,
            range(self.layout.num_workers),
            data,
            self.grads,
            self.device,
            graphs=bool(cfg["cuda-graphs"]),
            report=self._report,
        )
        self._honest_rows = torch.tensor(honest_ids, dtype=torch.long, device=self.device)
        self._byzantine_rows = torch.tensor(self.byzantine_ids, dtype=torch.long, device=self.device)
        self._positions: torch.Tensor | None = None  # (_BLOCK, W) on the device, from iteration _first
        self._first = 0
        # On a GPU, iterations run ahead of the host: a round is taken as clean and checked at the
        # next evaluation, checkpoint or block end (one read); a segment with a bad round is
        # replayed with the exact per-round screening (see _verify). On the CPU reads are free.
        self.speculate = self.device.type != "cpu"
        self._suspect: torch.Tensor | None = None
        self._segment: dict[str, Any] | None = None
        self.rule = rule_of(cfg)
        self.recorder = recorder_of(cfg, data, self.grads, self.device, log, run)
        self.x = self.grads.initial_point()
        self._messages: torch.Tensor | None = None
        self.start = 1
        if resume and (run.path / CHECKPOINT).exists():
            self._restore()
        elif resume:  # killed before its first checkpoint: it starts over, its records too (as in Flower)
            run.truncate_records(after=-1)

    def _report(self, message: str) -> None:
        """Something the run goes on without (e.g. CUDA graphs): a line in the log, and in the
        warnings of summary.json."""
        self.log(f"warning: {message}")
        self.recorder.warnings.append(message)

    # -- one iteration ---------------------------------------------------------------------------
    def messages(self, t: int) -> tuple[torch.Tensor, HonestStats, torch.Tensor]:
        """(honest (H, d), their statistics, all (W, d) in the role-blind order) at iteration t."""
        workers = self.workers
        workers.prefetch(t)  # the attack's draws overlap with the honest step
        honest = workers.honest_step(self.x, t)
        stats = HonestStats.of(honest)
        position = self._position(t)
        if self._messages is None:  # reused: a fresh (W, d) tensor per iteration costs page faults
            self._messages = torch.empty(
                self.layout.num_workers, self.grads.dim, dtype=honest.dtype, device=honest.device
            )
        everything = self._messages
        everything.index_copy_(0, position.index_select(0, self._honest_rows), honest)
        if self.byzantine_ids:
            bad = workers.byzantine_step(self.x, t, stats if workers.omniscient else None)
            bad = bad.to(device=honest.device, dtype=honest.dtype, non_blocking=True)
            if self.speculate:  # a GPU outruns the host's draws: start the next iteration's now
                workers.prefetch(t + 1)
            everything.index_copy_(0, position.index_select(0, self._byzantine_rows), bad)
        return honest, stats, everything

    def _block(self, t: int) -> int:
        """Make the block of role-blind positions (and orders) that holds iteration t; t's row in it."""
        if self._positions is None or not self._first <= t < self._first + _BLOCK:
            seed, workers = int(self.cfg["seed"]), self.layout.num_workers
            positions = role_blind_positions(seed, t, _BLOCK, workers)
            self._orders = positions.argsort(dim=1).numpy()  # row i: the worker at each position
            self._positions = positions.to(self.device)
            self._first = t
        return t - self._first

    def _position(self, t: int) -> torch.Tensor:
        """(W,) each worker's position in the role-blind order of iteration t, on the device."""
        row = self._block(t)  # first: it may replace the block
        return self._positions[row]

    def _order(self, t: int) -> list[int]:
        """``role_blind_order`` of iteration t (position -> worker), from the same block."""
        row = self._block(t)
        return self._orders[row].tolist()

    def _name_rows(self, info: dict[str, Any], weights, valid: torch.Tensor | None, t: int) -> dict[int, float]:
        """Krum-like rules' selected worker into ``info``; each aggregated worker's share (detection)."""
        if "selected" not in info and weights is None:
            return {}
        rows = valid.nonzero().reshape(-1).tolist() if valid is not None else list(range(self.layout.num_workers))
        order = self._order(t)
        name_selected(info, rows, order, self.byzantine_ids)
        return shares_of(weights, rows, order)

    def _row_workers(self, t: int, valid: torch.Tensor | None = None) -> list[int] | None:
        """The worker id of each aggregated row at iteration t, for rules that need it (else None)."""
        if not self.rule.needs_workers:
            return None
        order = self._order(t)
        return order if valid is None else [w for w, ok in zip(order, valid.tolist(), strict=True) if ok]

    def step(self, t: int) -> None:
        if self.speculate and self._segment is None:
            self._begin_segment(t)
        honest, stats, everything = self.messages(t)
        valid = finite_rows(everything)
        if self.speculate:
            self._speculative(t, honest, stats, everything, valid)
            return
        counts = {
            "dropped-nonfinite": int((~valid).sum()),
            "dropped-malformed": 0,
            "dropped-error": 0,
            "missing-messages": 0,  # in-process: every worker's message always arrives
        }
        kept = everything[valid] if counts["dropped-nonfinite"] else everything
        outcome = server_step(self.x, kept, self.rule, float(self.cfg.lr), self._row_workers(t, valid))
        self.x = outcome.point
        info = dict(outcome.info)
        counts["failed"] = int(outcome.failed)
        shares = {}
        if outcome.failed:
            counts[f"failed-{outcome.reason}"] = 1
            self.log(f"round {t} failed: {outcome.failure}; the model is unchanged")
        else:
            shares = self._name_rows(info, outcome.weights, valid, t)
        aggregate = outcome.aggregate
        self.recorder.observe(t, honest, aggregate, counts, info, honest_mean=stats.mean, shares=shares)

    # -- speculation (GPU) ------------------------------------------------------------------------
    def _speculative(
        self, t: int, honest: torch.Tensor, stats: HonestStats, everything: torch.Tensor, valid: torch.Tensor
    ) -> None:
        """The round as if every message were finite and the step clean, checked later on the device."""
        outcome = speculative_step(self.x, everything, valid, self.rule, float(self.cfg.lr), self._row_workers(t))
        if outcome is None:  # the rule cannot run on all rows blind: this segment goes exact
            self._replay(t, include_current=True)
            return
        self.x = outcome.point
        self._suspect += ~outcome.ok
        info = dict(outcome.info)
        shares = self._name_rows(info, outcome.weights, None, t)
        counts = dict.fromkeys(_CLEAN, 0)
        self.recorder.observe(t, honest, outcome.aggregate, counts, info, honest_mean=stats.mean, shares=shares)

    def _begin_segment(self, t: int) -> None:
        self._suspect = torch.zeros((), dtype=torch.int64, device=self.device)
        self._segment = {
            "first": t,
            "x": self.x.clone(),
            "workers": self.workers.state_dict(),
            "rule": self.rule.state_dict(),
            "recorder": self.recorder.interval_state(),
        }

    def _verify(self, t: int) -> None:
        """End the speculative segment at iteration t: if any of its rounds had a non-finite message,
        aggregate or step, run it again round by round with the exact screening (the records then
        say what happened, as on the CPU)."""
        if self._segment is None:
            return
        if int(self._suspect) > 0:
            self._replay(t, include_current=False)
        self._segment = None

    def _replay(self, t: int, include_current: bool) -> None:
        seg = self._segment
        self._segment = None
        self.x = seg["x"]
        self.workers.load_state_dict(seg["workers"])
        self.rule.load_state_dict(seg["rule"])
        self.recorder.load_interval_state(seg["recorder"])
        self.speculate = False
        try:
            for s in range(seg["first"], t + (1 if include_current else 0)):
                self.step(s)
        finally:
            self.speculate = True

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        if self.done is not None:  # finished before: its summary, the folder untouched
            self.run_dir.unlock()
            return self.done
        rounds = int(self.cfg["num-server-rounds"])
        every = int(self.cfg["checkpoint-every"])
        try:
            self.recorder.begin(self.start)
            if self.start == 1:
                self.log(f"results: {self.run_dir.path}")
                for warning in self.recorder.warnings:
                    self.log(f"warning: {warning} (running anyway: breakdown studies need it)")
                self.recorder.evaluate(0, self.x)
            for t in range(self.start, rounds + 1):
                self.step(t)
                due, keep = self.recorder.due(t), every and t % every == 0 and t < rounds
                if due or keep or t == rounds or (self._segment is not None and t - self._segment["first"] >= _BLOCK):
                    self._verify(t + 1)
                if due:
                    self.recorder.evaluate(t, self.x)
                if keep:
                    self._checkpoint(t)
            self.run_dir.save_model(self.grads.unflatten(self.x))
            (self.run_dir.path / CHECKPOINT).unlink(missing_ok=True)
            summary = self.recorder.finish("finished")
        except BaseException as exc:
            status, error = status_of(exc)
            if not self.recorder.finished:  # (a summary that could not be written is not tried twice)
                try:
                    self.recorder.finish(status, error)
                except RunFolderError as unrecorded:
                    self.log(str(unrecorded))
            self.log(f"{status}: {error}; results so far in {self.run_dir.path}")
            raise
        finally:
            self.run_dir.unlock()
        self.log(ending_line("finished", summary, self.run_dir.path))
        return summary

    # -- checkpoints --------------------------------------------------------------------------------
    def _checkpoint(self, t: int) -> None:
        state = {
            "iteration": t,
            "x": self.x.cpu(),
            "workers": self.workers.state_dict(),
            "rule": self.rule.state_dict(),
            "recorder": self.recorder.state_dict(),
        }
        self.run_dir.save_torch(CHECKPOINT, state)

    def _restore(self) -> None:
        state = self.run_dir.load_torch(CHECKPOINT)
        with self.run_dir.restoring(CHECKPOINT):
            t = int(state["iteration"])
            self.x = state["x"].to(self.device)
            self.workers.load_state_dict(state["workers"])
            self.rule.load_state_dict(state["rule"])
            self.recorder.load_state_dict(state["recorder"])
        self.run_dir.truncate_records(after=t)  # records written after the checkpoint are recomputed
        self.start = t + 1
        self.recorder.resumed(t + 1)


def run_local(cfg: RunConfig, log: Log = print) -> dict[str, Any]:
    """Run (or resume, or skip when finished) one experiment in this process; returns its summary."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    local = LocalRun(cfg, log=log)
    if local.done is not None:
        log(f"already finished: {local.run_dir.path}")
        return local.run()
    summary = local.run()
    summary["engine_wall_s"] = round(time.perf_counter() - start, 3)
    return summary
