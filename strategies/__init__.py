"""Server side: aggregation rules (pure torch) and the RobustSGD Flower Strategy.

``strategies.aggregators`` imports no Flower; ``RobustSGD`` is loaded on first use.
"""

from strategies.aggregators import RULES, Aggregate, AggregationError, Rule, make_rule

__all__ = ["RULES", "Aggregate", "AggregationError", "RobustSGD", "Rule", "make_rule"]


def __getattr__(name: str):
    if name == "RobustSGD":
        from strategies.strategy import RobustSGD

        return RobustSGD
    raise AttributeError(name)
