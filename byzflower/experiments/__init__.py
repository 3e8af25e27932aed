"""Experiment tooling above the engines: sweeps over optimizers x rules x attacks (``sweep``, local
processes or Ray) and the paper-style tables and figures from run folders (``report``).

May import: ``byzflower.config``, ``byzflower.engine``, ``byzflower.factory``,
``byzflower.records`` and ``byzflower.processes``; never ``byzflower.flower`` (a sweep runs the
local engine).
"""
