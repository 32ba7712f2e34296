"""Is the digits full-data reference of ``evaluate-synthetic`` converged? Trains fresh
ConvNets (width 64, depth 2, instance norm) on the whole train split of the digits data in
a kept store, with evaluate-synthetic's protocol (SGD lr 0.01, momentum 0.9, wd 5e-4, batch
256, final weights; DSA or none), and prints their mean ± std test accuracy after several
epoch counts of the same runs, as JSON.

    python -m benchmarks.dd_full_curve STORE none|dsa [NETS]

STORE holds a committed ``load-digits`` artifact (e.g. ``DD_BENCH_STORE``). Recorded in
``benchmarks/results/dd2_protocol.md`` (section 1)."""

from __future__ import annotations

import json
import os
import sys
import time

MARKS = [10, 30, 50, 100, 200, 300]


def curve(data, augment: bool, seed: int) -> dict[int, float]:
    from stages.distill.dd_common import NetConfig, accuracy, num_classes_of, real_split, train_net
    x, y = real_split(data, "train", "dd_full_curve")
    x_test, y_test = real_split(data, "test", "dd_full_curve")
    arch = NetConfig().arch(x.shape[1:], num_classes_of(data, y))
    acc = {}

    def on_epoch(epoch, net):
        if epoch in MARKS:
            acc[epoch] = accuracy(net, x_test, y_test)
            net.train()
    train_net(arch, x, y, epochs=max(MARKS), lr=0.01, seed=seed, augment=augment,
              on_epoch=on_epoch)
    return acc


def main(store: str, mode: str, nets: int = 4) -> dict:
    import numpy as np
    import ray

    from pipelines._internal.store import Store
    from pipelines.artifacts import Dataset
    if mode not in ("none", "dsa"):
        sys.exit(f"dd_full_curve: mode '{mode}' is not allowed; allowed: none, dsa")
    keys = [k for k in os.listdir(os.path.join(store, "load-digits")) if not k.startswith("_")]
    if len(keys) != 1:  # the curve must be of the one digits split the cells used
        sys.exit(f"dd_full_curve: {store} holds {len(keys)} load-digits artifacts "
                 f"({', '.join(keys) or 'none'}); allowed: exactly one")
    manifest = Store(store).manifest("load-digits", keys[0])
    data = Dataset.from_manifest(os.path.join(store, "load-digits", keys[0]),
                                 manifest["outputs"]["data"])
    t0 = time.time()
    ray.init(include_dashboard=False, log_to_driver=False)
    task = ray.remote(num_cpus=1)(curve)
    runs = ray.get([task.remote(data, mode == "dsa", 1000 + s) for s in range(nets)])
    return {"mode": mode, "nets": nets, "seconds": round(time.time() - t0, 1),
            "accuracy_by_epoch": {e: [round(100 * float(np.mean([r[e] for r in runs])), 2),
                                      round(100 * float(np.std([r[e] for r in runs])), 2)]
                                  for e in MARKS}}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:4]))))
