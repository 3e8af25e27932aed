"""ClientApp: train locally, reply with the model and the number of examples (Flower's quickstart).
Clients with partition-id < num-byzantine are attackers: they reply with a poisoned model."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from robust_quickstart.task import Net, load_partition, train

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    pid, parts = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    net = Net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loader = load_partition(pid, parts)
    loss = train(net, loader, int(context.run_config["local-epochs"]), float(context.run_config["lr"]))
    state = net.state_dict()
    if pid < int(context.run_config["num-byzantine"]):  # an attacker
        if context.run_config["attack"] == "noise":
            state = {k: 100.0 * torch.randn_like(v) for k, v in state.items()}
        else:
            state = {k: -10.0 * v for k, v in state.items()}
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(loader.dataset)})
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)
