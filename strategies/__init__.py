"""Server side: aggregation rules (pure torch), the RobustSGD Flower Strategy (gradient rounds)
and RobustFedAvg (FedAvg rounds with any rule).

``strategies.aggregators`` imports no Flower; the strategies are loaded on first use.
"""

from strategies.aggregators import RULES, Aggregate, AggregationError, Rule, make_rule

__all__ = ["RULES", "Aggregate", "AggregationError", "RobustFedAvg", "RobustSGD", "Rule", "make_rule"]


def __getattr__(name: str):
    if name == "RobustSGD":
        from strategies.strategy import RobustSGD

        return RobustSGD
    if name == "RobustFedAvg":
        from strategies.robust_fedavg import RobustFedAvg

        return RobustFedAvg
    raise AttributeError(name)
