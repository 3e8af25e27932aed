"""A bare Flower app doing the same exchange as byzflower's defaults, with nothing else.

Each node computes one mini-batch SGD gradient per worker it hosts (plain autograd, a loop over
workers), the server averages them with ``grid.send_and_receive`` and steps the model. It
writes the wall time of every round to ``timings``.
"""

import json
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from byzflower.data import load_dataset, partition
from byzflower.models import MLP

server = ServerApp()
client = ClientApp()
_CACHE = {}


@client.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    pid, k = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    w = int(cfg["num-workers"])
    key = (pid, k)
    if key not in _CACHE:
        data = load_dataset("mnist", cfg["data-dir"])
        parts = partition("mnist", cfg["data-dir"], w, "iid", int(cfg["seed"]))
        workers = range(pid * w // k, (pid + 1) * w // k)
        _CACHE[key] = [
            (data.inputs(data.train_images[parts[i]]), torch.from_numpy(data.train_labels[parts[i]])) for i in workers
        ]
    model = MLP()
    flat = torch.from_numpy(msg.content["arrays"]["x"].numpy())
    torch.nn.utils.vector_to_parameters(flat, model.parameters())
    t = int(msg.content["config"]["round"])
    rows = []
    for i, (x, y) in enumerate(_CACHE[key]):
        gen = torch.Generator().manual_seed(t * 1000 + pid * 100 + i)
        idx = torch.randint(0, len(y), (int(cfg["batch-size"]),), generator=gen)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        rows.append(torch.nn.utils.parameters_to_vector(p.grad for p in model.parameters()))
    block = torch.stack(rows) if rows else torch.zeros(0, flat.numel())
    return Message(RecordDict({"rows": ArrayRecord({"rows": Array(block.numpy())})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    x = torch.nn.utils.parameters_to_vector(MLP().parameters()).detach()
    nodes = list(grid.get_node_ids())
    times = []
    for t in range(1, int(cfg["num-server-rounds"]) + 1):
        start = time.perf_counter()
        content = RecordDict({"arrays": ArrayRecord({"x": Array(x.numpy())}), "config": ConfigRecord({"round": t})})
        msgs = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
        replies = grid.send_and_receive(msgs)
        rows = np.concatenate([r.content["rows"]["rows"].numpy() for r in replies if r.has_content()])
        x = x - float(cfg["lr"]) * torch.from_numpy(rows).mean(0)
        times.append(time.perf_counter() - start)
    if cfg["timings"]:
        with open(cfg["timings"], "w") as f:
            json.dump(times, f)
