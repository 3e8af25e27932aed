"""SVRG + GM on MNIST: the honest messages' spread against how far the model moved since the last snapshot.

Prints one JSON line every 250 iterations: the spread (sqrt of the honest messages' variance), the honest
mean's norm, the model's distance from the last snapshot point (snapshots every 100 iterations, taken at
iterations 1, 101, ...; so 49 or 99 iterations of movement), accuracy on 5,000 training samples,
the share of them predicted with probability > 1 - 1e-4 (meaningful for mlp-notebook, whose outputs are
probabilities) and the median per-sample gradient norm over 1,000 of them.

    python docs/paper-notebook-h200/svrg_trace.py ATTACK ITERATIONS MODEL   # e.g. none 9000 mlp-notebook
"""

import json
import sys
import tempfile
import time

import torch
from torch.func import functional_call

from byzflower.config import resolve
from byzflower.engine import LocalRun
from byzflower.factory import dataset_of

torch.set_num_threads(2)
attack, last, model = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with tempfile.TemporaryDirectory() as tmp:
    overrides = {"optimizer": "svrg", "aggregator": "gm", "attack": attack, "model": model}
    cfg = resolve({**overrides, "num-server-rounds": 10**6, "eval-every": 10**6, "results-dir": tmp})
    run = LocalRun(cfg, log=lambda _: None)
    data = dataset_of(cfg)
    idx = torch.randperm(len(data.train_labels), generator=torch.Generator().manual_seed(0))[:5000].numpy()
    inputs, targets = data.inputs(data.train_images[idx]), torch.as_tensor(data.train_labels[idx]).long()
    grads, seen, messages = run.grads, {}, run.messages

    def keep_honest(t: int):
        out = messages(t)
        seen["honest"] = out[0]
        return out

    run.messages = keep_honest
    begin, snapshot = time.time(), run.x.clone()
    for t in range(1, last + 1):
        if (t - 1) % 100 == 0:
            snapshot = run.x.clone()
        run.step(t)
        if t % 250:
            continue
        honest = seen["honest"]
        with torch.no_grad():
            out = functional_call(grads.model, grads.unflatten(run.x), (inputs,))
        rows = grads.sample_grads(run.x, inputs[:1000], targets[:1000])
        norms = sum(
            d.pow(2).sum(1) * (a.pow(2).sum(1) + 1) for a, d in zip(rows.inputs, rows.deltas, strict=True)
        ).sqrt()
        line = {
            "t": t,
            "spread": float(((honest - honest.mean(0)) ** 2).sum(1).mean().sqrt()),
            "mean_norm": float(honest.mean(0).norm()),
            "moved": float((run.x - snapshot).norm()),
            "accuracy": float((out.argmax(1) == targets).float().mean()),
            "saturated": float((out.max(1).values > 1 - 1e-4).float().mean()),
            "grad_norm_median": float(norms.median()),
            "seconds": round(time.time() - begin),
        }
        print(json.dumps(line), flush=True)
