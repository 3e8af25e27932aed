"""ServerApp: Flower's FedAvg loop, with RobustFedAvg in FedAvg's place (one line)."""

import json
from logging import INFO

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from robust_quickstart.task import Net, accuracy, test_set
from strategies.robust_fedavg import RobustFedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    torch.manual_seed(0)
    net = Net()
    x, y = test_set()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = Net()
        model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord({"accuracy": accuracy(model, x, y)})

    # strategy = FedAvg(fraction_evaluate=0.0)   <- the quickstart's line
    strategy = RobustFedAvg(cfg["rule"], f=int(cfg["num-byzantine"]), fraction_evaluate=0.0)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(net.state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
        evaluate_fn=evaluate,
    )
    final = {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()}
    # which clients the rule distrusted (by node id, most suspected first; the rule never knew the roles)
    suspicion = strategy.suspicion()
    log(INFO, "suspicion by node (mean distrust over rounds): %s", {n: round(s, 3) for n, s in suspicion.items()})
    if cfg["result-file"]:
        with open(str(cfg["result-file"]), "w") as fh:
            json.dump({"rule": cfg["rule"], "accuracy_by_round": final, "suspicion": suspicion}, fh)
