"""The README's accelerate recipe as a script, launched by the tests exactly as documented:

    torchrun --nproc_per_node 2 tests/accelerate_script.py OUT [--steps N] [--save-at K DIR] [--load DIR]

(CPU: ``Accelerator(cpu=True)``; torchrun starts the processes, accelerate finds them through
torchrun's environment).  A 4-layer MLP in 3 DDP buckets, DP-allocated widths; rank 0 writes the
final parameters to OUT (.npy) and the number of processes and the hook's groups (DDP's buckets) to OUT.json.
"""

import argparse
import json

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch import nn

from qoda import AdaptConfig, LayerPolicy, QodaHookState, QuantizerConfig, RefitSchedule
from qoda.integrations.accelerate import register_qoda_hook


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--from-step", type=int, default=0)
    ap.add_argument("--save-at", type=int, default=None)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--load", default=None)
    args = ap.parse_args()
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(bucket_cap_mb=0.25)])
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, opt = accelerator.prepare(model, opt)
    adapt = AdaptConfig(allocation="dp", budget=3.0, schedule=RefitSchedule((0, 4), every=3), observe_every=1)
    state = QodaHookState(policy=LayerPolicy.global_(QuantizerConfig.qsgd(4, 256)), start_iter=1, adapt=adapt)
    register_qoda_hook(accelerator, model, state)
    if args.load:
        accelerator.load_state(args.load)
    rank = accelerator.process_index
    for step in range(args.from_step, args.steps):
        g = torch.Generator().manual_seed(1000 * rank + step)
        x, y = torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        accelerator.backward(nn.functional.cross_entropy(model(x), y))
        opt.step()
        if args.save_at is not None and step + 1 == args.save_at:
            accelerator.save_state(args.dir)
    if accelerator.is_main_process:
        params = torch.cat([p.detach().reshape(-1) for p in accelerator.unwrap_model(model).parameters()])
        np.save(args.out, params.numpy())
        layout = getattr(state, "layout", [])  # the hook's groups of the last pass: DDP's buckets
        info = {"processes": accelerator.num_processes, "layout": [list(g) for g in layout]}
        with open(args.out + ".json", "w") as f:
            json.dump(info, f)


if __name__ == "__main__":
    main()
