"""byzflower: Byzantine-robust federated learning with variance-reduced honest clients, on Flower.

The package by role (a layer imports only those above it in this list; tests/test_layers.py):

- ``config``, ``core``, ``layout``, ``models``: the run configuration (every key, validated; the
  component registries' keys), the role-blind order, workers to nodes, the networks.
- ``processes``: what byzflower starts (SuperLinks, Ray), recorded and stopped by PID, and the
  watchdog that stops it when its owner dies (standard library only).
- ``data/``: data sets (built-in IDX sets, Hugging Face ``datasets`` ids and folders), partitions.
- ``records/``: what a run writes: its folder, records, evaluations and figures.
- ``factory``, ``engine``: a run's pieces built from its configuration; the in-process engine.
- ``flower/``: the Flower ServerApp / ClientApp, a node's workers, SuperLink / SuperNode processes.
- ``experiments/``: sweeps and paper-style reports over many runs.
- ``cli``: the ``byzflower`` command.

The math lives outside, in ``strategies`` (aggregation rules, the server step) and ``clients``
(estimators, attacks, gradients), which import neither Flower nor ``byzflower``.
"""

__version__ = "0.1.0"
