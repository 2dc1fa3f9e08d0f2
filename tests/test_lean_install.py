"""``pip install qoda`` is lean: the library and the DDP hook run on the core dependencies alone, every
extra of pyproject.toml is what :mod:`qoda.utils.extras` says it is, and a command whose extra is
missing stops with one line naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from qoda.utils.extras import EXTRA_INCLUDES, EXTRA_MODULES, modules

ROOT = Path(__file__).resolve().parents[1]
#: distribution name -> the module it installs, where the two differ (else ``-`` becomes ``_``)
DIST_MODULE = {"scikit-learn": "sklearn", "pillow": "PIL"}


def _name(requirement: str) -> str:
    """``"scikit-learn>=1.3"`` -> ``"scikit-learn"``; ``"qoda[train]"`` -> ``"qoda[train]"``."""
    for i, ch in enumerate(requirement):
        if ch in "<>=!~; ":
            return requirement[:i]
    return requirement


def test_extras_are_the_ones_pyproject_declares():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    core = {DIST_MODULE.get(n, n.replace("-", "_")) for n in map(_name, project["dependencies"])}
    assert core == {"torch", "numpy", "numba", "zlib_ng"}
    for extra, own in EXTRA_MODULES.items():
        names = [_name(r) for r in optional[extra]]
        includes = tuple(n[len("qoda["):-1] for n in names if n.startswith("qoda["))
        assert includes == EXTRA_INCLUDES[extra], extra
        assert sorted(DIST_MODULE.get(n, n.replace("-", "_")) for n in names if not n.startswith("qoda[")) == sorted(
            own
        ), extra
        assert not core & set(modules(extra))
    # dev is everything: the tests, and both integrations
    dev = {_name(r) for r in optional["dev"]}
    assert {"qoda[test]", "lightning", "accelerate"} <= dev


def test_readme_commands_install_what_they_run():
    readme = (ROOT / "README.md").read_text()
    first = next(line for line in readme.splitlines() if "qoda train --workers 2" in line and "pip install" in line)
    second = next(line for line in readme.splitlines() if "pytest" in line and "pip install" in line)
    assert "-e '.[train]'" in first
    assert "-e '.[dev]'" in second
    assert second.strip() in (ROOT / ".ci" / "run").read_text().splitlines()


# Hides every module of every extra (and the integrations') as if not installed: ``None`` in
# sys.modules makes ``import m`` raise ImportError and ``find_spec(m)`` return None (torch probes
# optional modules that way).  Then uses what a hook user uses.
LEAN_SCRIPT = """
import contextlib, io, json, os, sys, tempfile

BLOCKED = set(json.loads(sys.argv[1]))
sys.modules.update(dict.fromkeys(BLOCKED))

import torch
import torch.distributed as dist
from torch import nn

import qoda
from qoda import *  # every public name
from qoda.comm.ddp_hook import QodaHookState, qoda_hook

store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
ddp = nn.parallel.DistributedDataParallel(model)
state = QodaHookState(policy=LayerPolicy.global_(QuantizerConfig.qsgd(4, 256)), start_iter=0, adapt=None)
state.register(ddp)
x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
nn.functional.cross_entropy(model(x), y).backward()
exact = [p.grad.clone() for p in model.parameters()]
model.zero_grad()
nn.functional.cross_entropy(ddp(x), y).backward()
hooked = [p.grad for p in model.parameters()]
numel = sum(g.numel() for g in exact)
err = max((a - b).abs().max().item() for a, b in zip(hooked, exact))
norm = torch.cat([g.reshape(-1) for g in exact]).norm().item()
dist.destroy_process_group()

from qoda.cli import main

err_out = io.StringIO()
with contextlib.redirect_stderr(err_out):
    rc = main(["train", "--steps", "1"])
help_out = io.StringIO()
with contextlib.redirect_stdout(help_out):
    try:
        main(["train", "--help"])
    except SystemExit as e:
        help_rc = e.code
print(json.dumps({
    "calls": state.stats.calls, "payload_bits": state.stats.payload_bits, "numel": numel, "err": err, "norm": norm,
    "rc": rc, "stderr": err_out.getvalue(), "help_rc": help_rc, "help": help_out.getvalue(),
    "loaded": sorted(m for m, v in sys.modules.items() if m.split(".")[0] in BLOCKED and v is not None),
}))
"""


def test_library_and_hook_run_on_the_core_dependencies_alone():
    blocked = sorted({m for e in EXTRA_MODULES for m in modules(e)} | {"lightning", "accelerate"})
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(LEAN_SCRIPT), json.dumps(blocked)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["loaded"] == []
    # one quantized exchange: the payload is compressed (4-bit codes and norms), the gradient is its
    # quantization (one worker: Q(g); each coordinate within a bucket norm <= the gradient's norm of g)
    assert r["calls"] >= 1 and 0 < r["payload_bits"] < 8 * r["numel"]
    assert 0 < r["err"] <= r["norm"]
    # the trainer needs its extra: one line, naming it, exit code 2; its help is still there
    assert r["rc"] == 2
    assert r["stderr"].count("\n") == 1 and "pip install 'qoda[train]'" in r["stderr"], r["stderr"]
    assert r["help_rc"] == 0 and "--compression" in r["help"]
