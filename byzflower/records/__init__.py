"""What a run writes: its folder (``results``), its records and evaluations (``experiment``:
``Recorder``, ``Evaluator``) and its figures (``plots``). Both engines record through here.

May import: ``byzflower.config`` and ``byzflower.data`` (and torch, numpy, matplotlib); never an
engine, Flower, or the experiment tooling.
"""
