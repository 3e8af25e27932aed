"""The Flower side: the ServerApp and ClientApp, a node's workers, and the processes that run them.

``server_app`` / ``client_app`` are the app's components (``pyproject.toml``); ``node`` and
``node_state`` hold a SuperNode's workers and their state on its disk; ``harness`` sends rounds
and checks replies; ``flower_runner`` starts and stops SuperLink / SuperNode / simulation
processes by PID (through ``byzflower.processes``); ``credentials`` makes TLS and SuperNode-authentication material.

May import: the pure layers (``strategies``, ``clients``), Flower, and every other part of
``byzflower`` except ``byzflower.experiments`` and ``byzflower.cli``. Nothing outside this
package and the CLI imports it, so the local engine runs where Flower is not installed.
"""
