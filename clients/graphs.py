"""An estimator's steady-state step replayed as one CUDA graph.

``Estimator.prepare`` does the host-side part of an iteration and says whether ``compute`` is then
a fixed sequence of kernels; when it is, this wrapper captures ``compute`` once into a CUDA graph
(a few hundred kernel launches become one replay) and replays it at every later such iteration,
with the point copied into the graph's input first. Anything else (SAGA's first step, an SVRG
snapshot, a SARAH restart, a CPU device) runs eagerly, so the numbers are the eager path's.
A capture that fails falls back to the eager path for good and says why (``fallback``, and to
``report`` when given: a run then logs it and lists it in its summary's warnings).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from clients.estimators import Estimator


class GraphedEstimator:
    """Wraps an estimator: the same ``step(x, iteration)``, replayed from a CUDA graph when it can be.

    Attributes:
        estimator: the wrapped estimator (its state is the wrapped one's, always).
        replays: iterations served by a graph replay.
        fallback: why graphs are not used (None while they are, or may be).
    """

    def __init__(self, estimator: Estimator, warmup: int = 2, report: Callable[[str], None] | None = None) -> None:
        self.estimator = estimator
        self.warmup = int(warmup)
        self.report = report
        self.replays = 0
        self.fallback: str | None = None if estimator.data.device.type == "cuda" else "not on a CUDA device"
        self._graph: torch.cuda.CUDAGraph | None = None
        self._x: torch.Tensor | None = None
        self._out: torch.Tensor | None = None

    def __getattr__(self, name: str):  # state_dict, load_state_dict, num_workers, ...
        return getattr(self.estimator, name)

    def step(self, x: torch.Tensor, iteration: int) -> torch.Tensor:
        """(k, d) messages at x for ``iteration``; the tensor is reused by the next replay."""
        est = self.estimator
        static = est.prepare(x, iteration)
        if not static or self.fallback is not None:
            out = est.compute(x)
        else:
            if self._graph is None:
                self._capture(x)
            if self._graph is None:
                out = est.compute(x)
            else:
                self._x.copy_(x)
                self._graph.replay()
                self.replays += 1
                out = self._out
        est.state["step"].fill_(iteration)
        return out

    def _capture(self, x: torch.Tensor) -> None:
        est = self.estimator
        saved = est.state_dict()  # warm-up and capture write the state: put it back after
        self._x = x.detach().clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):  # lazy initialisations (cuBLAS handles, autograd) outside the graph
                    est.compute(self._x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._out = est.compute(self._x)
            self._graph = graph
        except Exception as exc:
            self.fallback = f"CUDA graph capture failed ({type(exc).__name__}: {exc}); running eagerly"
            self._graph, self._out = None, None
            if self.report is not None:  # slower, same numbers: said, not hidden
                self.report(f"{est.name} steps without CUDA graphs: {self.fallback}")
        finally:
            est.load_state_dict(saved)
