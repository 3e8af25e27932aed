"""Every run-config key: type, default, meaning and validation, in one place.

``pyproject.toml``'s ``[tool.flwr.app.config]`` mirrors the defaults here (a test checks it), the
README's table is generated from ``KEYS`` (``byzflower config --markdown``), and both engines
validate through ``resolve``: every problem is reported at once, before any work starts.

The aggregation rules', attacks' and estimators' keys are not written here: they come from the
component registries (``strategies.aggregators.RULES``, ``clients.attacks.ATTACKS``,
``clients.estimators.ESTIMATORS``), each key with its default taken from the constructor, so a new
component brings its keys with it; the model and data-set names come from ``byzflower.models`` and
``byzflower.data``.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from byzflower.data import BUILT_IN
from byzflower.layout import Layout
from byzflower.models import MODELS
from clients.attacks import ATTACKS as ATTACK_CLASSES
from clients.estimators import ESTIMATORS
from strategies.aggregators import PRE_AGGREGATORS, RULES, pre_aggregator_names, takes_f


class ConfigError(ValueError):
    """One or more run-config values are invalid."""


@dataclass(frozen=True)
class Key:
    name: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None  # inclusive
    positive: bool = False  # > 0
    maximum: float | None = None  # inclusive
    planned: tuple[str, ...] = ()  # choices named in the roadmap but not built yet
    # besides the choices, values of this form are valid (checked further where they are used)
    other: tuple[str, str] | None = None  # (regular expression, the form in words)

    @property
    def kind(self) -> type:
        return type(self.default)

    def allowed(self) -> str:
        """The valid values in words, derived from the declaration (numbers are always finite)."""
        if self.kind is bool:
            return "true, false"
        noun = "an integer" if self.kind is int else "a finite number"
        shown = (lambda b: str(int(b))) if self.kind is int else (lambda b: f"{b:g}")
        bounds = []
        if self.positive:
            bounds.append("> 0")
        elif self.minimum is not None:
            bounds.append(f">= {shown(self.minimum)}")
        if self.maximum is not None:
            bounds.append(f"<= {shown(self.maximum)}")
        return f"{noun} {' and '.join(bounds)}".strip()

    def in_range(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.positive and not value > 0:
            return False
        if self.minimum is not None and value < self.minimum:
            return False
        return self.maximum is None or value <= self.maximum


# 'package.module:attribute', as Flower names app components
_IMPORT_PATH = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*"
OPTIMIZERS = tuple(ESTIMATORS)
# The paper's step sizes and batch sizes (see the notebook's configs), as each estimator states them.
OPTIMIZER_DEFAULTS = {
    name: {"lr": cls.default_lr, "batch-size": cls.default_batch_size} for name, cls in ESTIMATORS.items()
}


def _defaults_in_words(key: str) -> str:
    """e.g. 'sgd 5, batch-sgd 50, saga/svrg/sarah 1'."""
    groups: dict[Any, list[str]] = {}
    for name, defaults in OPTIMIZER_DEFAULTS.items():
        groups.setdefault(defaults[key], []).append(name)
    return ", ".join(f"{'/'.join(names)} {value:g}" for value, names in groups.items())


AGGREGATORS = tuple(RULES)
ATTACKS = ("none", *ATTACK_CLASSES)


def _default_of(cls: type, argument: str) -> Any:
    parameter = inspect.signature(cls).parameters.get(argument)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        raise TypeError(f"{cls.__name__}: option argument {argument!r} is not a constructor argument with a default")
    return parameter.default


def component_keys(classes: Mapping[str, type]) -> list[Key]:
    """The run-config keys a family of components declares (``options``), in registry order; a key
    shared by several components (inherited) is one key, its help naming who reads it."""
    users: dict[str, list[str]] = {}
    spec: dict[str, tuple[type, tuple[str, str, dict]]] = {}
    for name, cls in classes.items():
        for key, option in cls.options.items():
            users.setdefault(key, []).append(name)
            spec.setdefault(key, (cls, option))
    keys = []
    for key, (cls, (argument, meaning, constraints)) in spec.items():
        default = _default_of(cls, argument)
        keys.append(Key(key, default, f"{', '.join(users[key])}: {meaning}", **constraints))
    return keys


def build_component(kind: str, cls: type, cfg: Mapping[str, Any], context: Mapping[str, Any]) -> Any:
    """``cls`` built from its run-config keys (``options``) and what the run provides (``context``)."""
    by_argument = {argument: key for key, (argument, _, _) in cls.options.items()}
    args: dict[str, Any] = {}
    parameters = inspect.signature(cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):  # **kwargs: to the base class
        args.update(context)
    for parameter in parameters:
        if parameter.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        if parameter.name in by_argument:
            args[parameter.name] = cfg[by_argument[parameter.name]]
        elif parameter.name in context:
            args[parameter.name] = context[parameter.name]
        elif parameter.default is inspect.Parameter.empty:
            raise TypeError(
                f"{kind} {cls.name!r}: constructor argument {parameter.name!r} has no run-config key and the run "
                f"does not provide it (it provides: {', '.join(context)})"
            )
    return cls(**args)


# W = H + B at most: every iteration stacks one message per worker and draws a role-blind order of
# W for each of the next 256 iterations (200 MB at this W); beyond it a run fails deep in torch.
MAX_WORKERS = 100_000

_RULE_KEYS = component_keys(RULES)
_PRE_KEYS = component_keys(PRE_AGGREGATORS)
_ESTIMATOR_KEYS = component_keys(ESTIMATORS)
_ATTACK_KEYS = component_keys(ATTACK_CLASSES)
_TAKE_F = ", ".join(name for name, cls in {**RULES, **PRE_AGGREGATORS}.items() if takes_f(cls))

_KEYS = [
    # -- the experiment --------------------------------------------------------------------
    Key("num-server-rounds", 300, "Aggregation iterations (one model step each).", positive=True),
    Key("eval-every", 50, "Iterations between evaluations (the last iteration is always evaluated).", positive=True),
    Key("seed", 1, "Seed of everything: data split, sampling, model init, attacks.", minimum=0, maximum=2**63 - 1),
    Key("num-honest", 50, "Honest workers H (the paper: 50).", minimum=0, maximum=MAX_WORKERS),
    Key(
        "num-byzantine",
        20,
        "Byzantine workers B (the paper: 20); attack='none' leaves them out (W = H).",
        minimum=0,
        maximum=MAX_WORKERS - 1,  # beside at least one honest worker
    ),
    Key("attack", "gaussian", "What Byzantine workers send (see the table of attacks).", choices=ATTACKS),
    *_ATTACK_KEYS,
    Key("byzantine-ids", "", "Which workers are Byzantine, e.g. '0,7,9'; '' = the last num-byzantine."),
    # -- honest workers ----------------------------------------------------------------------
    Key("optimizer", "sgd", "Honest gradient estimator (see the table of estimators).", choices=OPTIMIZERS),
    Key(
        "batch-size",
        0,
        f"Samples per worker per iteration; 0 = the optimizer's default ({_defaults_in_words('batch-size')}).",
        minimum=0,
    ),
    Key("lr", 0.0, f"Step size gamma; 0 = the optimizer's default ({_defaults_in_words('lr')}).", minimum=0),
    Key("weight-decay", 0.0, "lambda: adds lambda * x to every honest gradient.", minimum=0),
    *_ESTIMATOR_KEYS,
    # -- server ------------------------------------------------------------------------------
    Key("aggregator", "gm", "Aggregation rule (see the table of rules).", choices=AGGREGATORS),
    Key(
        "pre-aggregator",
        "none",
        "What transforms the messages before the rule (see the table of pre-aggregators); several apply left to right.",
        choices=("none", *PRE_AGGREGATORS),
        other=(r"[a-z-]+( *, *[a-z-]+)+", "a comma-separated list of them, e.g. 'bucketing,nnm'"),
    ),
    *_PRE_KEYS,
    Key(
        "aggregator-f",
        -1,
        f"f, the Byzantine messages the rule assumes ({_TAKE_F}); -1 = the run's Byzantine workers.",
        minimum=-1,
    ),
    *_RULE_KEYS,
    Key(
        "round-timeout",
        300.0,
        "Flower engines: seconds to wait for the nodes' replies in a round; then the round aggregates what "
        "arrived and the missing workers are recorded.",
        positive=True,
        maximum=86400.0,
    ),
    Key(
        "min-workers",
        0,
        "Flower engines: fewest workers' messages a round may aggregate; fewer stops the run (failed, naming "
        "the missing workers); 0 = what the rule needs.",
        minimum=0,
    ),
    # -- model and data ----------------------------------------------------------------------
    Key(
        "model",
        "mlp",
        "mlp: the paper's 784-50-10 tanh network; mlp-notebook: the authors' notebook network behind the "
        "published numbers (tanh on the input, softmax before the cross-entropy); cnn: a small conv net; "
        "logreg: multinomial logistic regression (convex; the paper's Figs. 3-6 with weight-decay=0.01); "
        "resnet18, resnet50: torchvision's ResNets with GroupNorm (a 3x3 stem for pictures up to 64 pixels); "
        "or your own: 'package.module:factory', called as factory(input_shape=(C, H, W), num_classes=K) "
        "and returning an nn.Module that outputs logits.",
        choices=tuple(MODELS),
        other=(_IMPORT_PATH, "package.module:factory"),
    ),
    Key(
        "dataset",
        "mnist",
        "mnist, fashion-mnist (built in; fetched without the Hugging Face hub where needed); ijcnn1, covtype "
        "(LIBSVM binary sets of the paper's convex experiments: fetched from the LIBSVM site, needs internet "
        "once); a Hugging Face / Flower Datasets id such as 'uoft-cs/cifar10' (downloaded once; needs "
        "internet), or a local folder written by DatasetDict.save_to_disk ('./folder'), with 'train' and "
        "'test' splits, an image column and a label column.",
        choices=BUILT_IN,
        other=(r"\S*/\S*", "owner/name or ./folder"),
    ),
    Key(
        "partitioner",
        "iid",
        "How the training set is split over the honest workers (flwr-datasets partitioners); 'full': every honest "
        "worker holds the whole training set (no heterogeneity: the paper's delta^2 = 0, Fig. 5).",
        choices=("iid", "dirichlet", "pathological", "full"),
    ),
    Key("dirichlet-alpha", 0.5, "Concentration of partitioner='dirichlet' (smaller = more skewed).", positive=True),
    Key("pathological-classes", 2, "Classes per worker with partitioner='pathological'.", positive=True),
    Key(
        "optimality-gap",
        False,
        "Record F(x) - F(x*) at every evaluation, F the honest workers' objective (their local mean losses "
        "averaged, plus weight-decay / 2 ||x||^2) and x* its minimiser (full-batch L-BFGS in float64, cached): "
        "model='logreg' with weight-decay > 0 only, where F is strongly convex.",
    ),
    Key(
        "eval-train-samples",
        0,
        "Training samples (a fixed seeded subset) for the train loss/accuracy; 0 = the whole set.",
        minimum=0,
    ),
    Key(
        "device",
        "auto",
        "Where workers and server compute: auto (a GPU when Flower/Ray gives one), cpu, cuda.",
        choices=("auto", "cpu", "cuda"),
    ),
    Key(
        "cuda-graphs",
        True,
        "On a GPU, replay each honest worker group's steady-state step as one CUDA graph (same numbers; "
        "falls back to plain kernels where a step cannot be captured).",
    ),
    # -- files -------------------------------------------------------------------------------
    Key("data-dir", "", "Data cache folder; '' = $BYZFLOWER_DATA_DIR or ~/.cache/byzflower."),
    Key("results-dir", "", "Where run folders go; '' = $BYZFLOWER_RESULTS_DIR or ~/byzflower-results."),
    Key(
        "run-name",
        "",
        "Name of the run folder (letters, digits and . _ - + = , only; no path); "
        "'' = <time>-<optimizer>-<aggregator>-<attack>-s<seed>.",
    ),
    Key(
        "checkpoint-every",
        1000,
        "Iterations between checkpoints of a named run (started again, it resumes; the Flower engines rebuild "
        "the workers' state at the checkpoint's model); 0 = never.",
        minimum=0,
    ),
]
KEYS: dict[str, Key] = {k.name: k for k in _KEYS}
DEFAULTS: dict[str, Any] = {k.name: k.default for k in _KEYS}


def _check_value(key: Key, value: Any) -> str | None:
    kind = key.kind
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        shown = {int: "an integer", float: "a number", str: "a quoted string", bool: "true or false"}[kind]
        return f"{key.name}={value!r} must be {shown}"
    if key.choices or key.planned:
        if value in key.planned and value not in key.choices:
            return (
                f"{key.name}={value!r} is not available yet in this version of byzflower; "
                f"available: {', '.join(key.choices)}"
            )
        if value not in key.choices and not (key.other and re.fullmatch(key.other[0], value)):
            more = f", or {key.other[1]}" if key.other else ""
            return f"{key.name}={value!r} is not valid; choose one of: {', '.join(key.choices)}{more}"
    if kind in (int, float) and not key.in_range(value):
        return f"{key.name}={value!r} is outside the allowed range: {key.allowed()}"
    return None


class RunConfig(Mapping[str, Any]):
    """Validated run config: a read-only mapping of every key, plus resolved values."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = dict(values)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    # Resolved values ----------------------------------------------------------------------
    @property
    def lr(self) -> float:
        return float(self["lr"]) or OPTIMIZER_DEFAULTS[self["optimizer"]]["lr"]

    @property
    def batch_size(self) -> int:
        return int(self["batch-size"]) or OPTIMIZER_DEFAULTS[self["optimizer"]]["batch-size"]

    @property
    def num_byzantine(self) -> int:
        """Byzantine workers that take part (none when attack='none')."""
        return 0 if self["attack"] == "none" else int(self["num-byzantine"])

    @property
    def num_workers(self) -> int:
        return int(self["num-honest"]) + self.num_byzantine

    @property
    def aggregator_f(self) -> int:
        """f for the rule: aggregator-f, or the run's Byzantine workers when it is -1."""
        f = int(self["aggregator-f"])
        return self.num_byzantine if f < 0 else f

    def resolved(self) -> dict[str, Any]:
        """Every key with the optimizer-dependent defaults filled in (what the run used)."""
        out = self.to_dict()
        out["lr"], out["batch-size"] = self.lr, self.batch_size
        return out


Check = Callable[[RunConfig], list[str]]
_CROSS_CHECKS: list[Check] = []


def cross_check(fn: Check) -> Check:
    """Register a check that looks at several keys at once."""
    _CROSS_CHECKS.append(fn)
    return fn


@cross_check
def _workers(cfg: RunConfig) -> list[str]:
    if cfg["num-honest"] < 1:
        return [
            f"num-honest={cfg['num-honest']} must be >= 1: honest workers are the ones that learn "
            "(and omniscient attacks need honest messages to see)"
        ]
    if cfg.num_workers > MAX_WORKERS:
        return [
            f"num-honest + num-byzantine = {cfg.num_workers:,} workers; one run takes at most {MAX_WORKERS:,} "
            "(each iteration stacks a message per worker)"
        ]
    return []


@cross_check
def _rule_fits(cfg: RunConfig) -> list[str]:
    import torch

    from strategies.aggregators import AggregationError

    try:
        rule = rule_of(cfg)
    except (ValueError, AggregationError) as exc:
        return [str(exc)]
    n = cfg.num_workers
    if cfg["min-workers"] > n:
        return [f"min-workers={cfg['min-workers']} exceeds the run's {n} workers"]
    if cfg["aggregator"] == "multi-krum" and cfg["krum-m"] > n:
        return [f"krum-m={cfg['krum-m']} exceeds the run's {n} workers; use 1..{n}, or 0 for n - f"]
    if n < rule.min_messages():
        return [
            f"aggregator={cfg['aggregator']!r} needs {rule.requirement()}, i.e. at least {rule.min_messages()} "
            f"messages, but the run has {n} workers; lower aggregator-f or add workers"
        ]
    if problem := rule.workers_problem(n):
        return [problem]
    try:  # what the rule (and any rule behind a pre-aggregator) refuses from the input's shape: MDA's cost
        rule.check(torch.zeros(n, 1))
    except AggregationError as exc:
        return [f"aggregator={cfg['aggregator']!r}: {exc}"]
    return []


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+,-]{0,127}")


@cross_check
def _run_name(cfg: RunConfig) -> list[str]:
    name = cfg["run-name"]
    if name and not RUN_NAME.fullmatch(name):
        return [
            f"run-name={name!r} must be one folder name inside results-dir: up to 128 letters, digits and "
            ". _ - + = , starting with a letter or digit (no '/', no '..', no absolute path)"
        ]
    return []


def parse_ids(text: str) -> list[int]:
    """'0, 7,9' -> [0, 7, 9] (ValueError on anything else)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    return [int(p) for p in parts]


@cross_check
def _byzantine_ids(cfg: RunConfig) -> list[str]:
    text = cfg["byzantine-ids"].strip()
    if not text or cfg["attack"] == "none":
        return []
    try:
        ids = parse_ids(text)
    except ValueError:
        return [f"byzantine-ids={text!r} must be comma-separated worker ids, e.g. '0,7,9'"]
    problems = []
    w = cfg.num_workers
    if len(ids) != cfg.num_byzantine:
        problems.append(f"byzantine-ids={text!r} lists {len(ids)} workers but num-byzantine={cfg.num_byzantine}")
    bad = sorted({i for i in ids if not 0 <= i < w})
    if bad:
        problems.append(f"byzantine-ids={text!r}: {bad} outside the workers 0..{w - 1}")
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        problems.append(f"byzantine-ids={text!r} repeats {repeated}")
    return problems


@cross_check
def _attack(cfg: RunConfig) -> list[str]:
    if cfg["attack"] != "none" and cfg["num-byzantine"] == 0:
        return [f"attack={cfg['attack']!r} needs num-byzantine >= 1 (or attack='none')"]
    if cfg["attack"] == "alie" and cfg["alie-z"] == 0:
        from clients.attacks import alie_z

        try:
            alie_z(cfg.num_workers, cfg.num_byzantine)
        except ValueError as exc:
            return [str(exc)]
    return []


@cross_check
def _sarah(cfg: RunConfig) -> list[str]:
    if cfg["optimizer"] == "sarah" and cfg["sarah-restart"] == "random" and cfg["sarah-interval"] < 2:
        return [
            f"sarah-interval={cfg['sarah-interval']} must be >= 2 with sarah-restart='random' (restarts 1..T-1 ahead)"
        ]
    return []


@cross_check
def _optimality_gap(cfg: RunConfig) -> list[str]:
    if not cfg["optimality-gap"]:
        return []
    problems = []
    if cfg["model"] != "logreg":
        problems.append(f"optimality-gap=true needs model='logreg' (a convex objective), got model={cfg['model']!r}")
    if not cfg["weight-decay"] > 0:
        problems.append("optimality-gap=true needs weight-decay > 0 (one minimiser; the paper uses 0.01)")
    return problems


@cross_check
def _classes(cfg: RunConfig) -> list[str]:
    if cfg["partitioner"] == "pathological" and cfg["pathological-classes"] > 10:
        return [f"pathological-classes={cfg['pathological-classes']} must be <= 10 (the data has 10 classes)"]
    return []


def rule_of(cfg: RunConfig):
    """The aggregation rule the config describes, behind its pre-aggregators (a fresh object:
    rules may keep state)."""
    run = {"f": cfg.aggregator_f, "seed": int(cfg["seed"])}
    rule = build_component("aggregator", RULES[cfg["aggregator"]], cfg, run)
    for name in reversed(pre_aggregator_names(cfg["pre-aggregator"])):
        rule = build_component("pre-aggregator", PRE_AGGREGATORS[name], cfg, {**run, "rule": rule})
    return rule


def attack_of(cfg: RunConfig):
    """The attack object the config describes (None for attack='none')."""
    if cfg["attack"] == "none":
        return None
    cls = ATTACK_CLASSES[cfg["attack"]]
    context = {"seed": int(cfg["seed"]), "num_workers": cfg.num_workers, "num_byzantine": cfg.num_byzantine}
    if "rule" in inspect.signature(cls).parameters:  # attacks optimised against the rule get their own copy
        context["rule"] = rule_of(cfg)
    return build_component("attack", cls, cfg, context)


def min_workers_of(cfg: RunConfig) -> int:
    """The fewest workers' messages a round may aggregate: min-workers, else what the rule needs."""
    return int(cfg["min-workers"]) or rule_of(cfg).min_messages()


def layout_of(cfg: RunConfig) -> Layout:
    """Which workers are honest and which Byzantine (byzantine-ids, else the last num-byzantine)."""
    if cfg.num_byzantine and cfg["byzantine-ids"].strip():
        return Layout(int(cfg["num-honest"]), tuple(sorted(parse_ids(cfg["byzantine-ids"]))))
    return Layout.last(int(cfg["num-honest"]), cfg.num_byzantine)


def warnings_of(cfg: RunConfig) -> list[str]:
    """Settings that run but that the rule cannot tolerate in theory (breakdown studies), and a rule
    trusting a worker the run makes Byzantine (MoNNA's pivot)."""
    rule = rule_of(cfg)
    problems = [p] if (p := rule.tolerance_problem(cfg.num_workers, cfg.num_byzantine)) else []
    for w in sorted(set(rule.trusted_workers()) & set(layout_of(cfg).byzantine_ids)):
        problems.append(
            f"{cfg['aggregator']} trusts worker {w}'s message, but worker {w} is Byzantine in this run "
            "(its guarantee assumes a trusted, honest worker)"
        )
    return problems


def resolve(run_config: Mapping[str, Any]) -> RunConfig:
    """Defaults overlaid with ``run_config``, validated; raises ConfigError listing every problem."""
    unknown = sorted(set(run_config) - set(KEYS))
    problems = [f"unknown key {k!r}; valid keys: {', '.join(KEYS)}" for k in unknown]
    values = {**DEFAULTS, **{k: v for k, v in run_config.items() if k in KEYS}}
    for name, key in KEYS.items():
        if (p := _check_value(key, values[name])) is not None:
            problems.append(p)
    if not problems:
        values = {k: float(v) if KEYS[k].kind is float else v for k, v in values.items()}
        cfg = RunConfig(values)
        for check in _CROSS_CHECKS:
            problems.extend(check(cfg))
        if not problems:
            return cfg
    raise ConfigError("invalid run config:\n  - " + "\n  - ".join(problems))


def markdown_table() -> str:
    """The README's table of keys, with the valid values derived from each key's declaration."""
    rows = ["| key | default | valid values | meaning |", "|---|---|---|---|"]
    for k in KEYS.values():
        default = f"'{k.default}'" if isinstance(k.default, str) else str(k.default).lower()
        if k.choices:
            valid = ", ".join(k.choices) + (f", or {k.other[1]}" if k.other else "")
        elif k.kind in (int, float):
            valid = k.allowed()
        else:
            valid = "text"
        rows.append(f"| `{k.name}` | `{default}` | {valid} | {k.help} |")
    return "\n".join(rows)


def toml_table() -> str:
    """The ``[tool.flwr.app.config]`` table of pyproject.toml."""
    lines = ["[tool.flwr.app.config]"]
    for k in KEYS.values():
        v = k.default
        value = f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else repr(v)
        lines.append(f"{k.name} = {value}")
    return "\n".join(lines)


README_START, README_END = "<!-- keys:start (byzflower config --sync) -->", "<!-- keys:end -->"


def sync_files(root: Path) -> list[str]:
    """Rewrite pyproject.toml's config table and the README's key table from ``KEYS``."""
    changed = []
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    start = text.index("[tool.flwr.app.config]")
    end = text.find("\n[", start + 1)
    new = text[:start] + toml_table() + "\n" + (text[end:] if end != -1 else "")
    if new != text:
        pyproject.write_text(new)
        changed.append(str(pyproject))
    readme = root / "README.md"
    text = readme.read_text()
    a, b = text.index(README_START) + len(README_START), text.index(README_END)
    new = text[:a] + "\n" + markdown_table() + "\n" + text[b:]
    if new != text:
        readme.write_text(new)
        changed.append(str(readme))
    return changed
