"""Compiling the kernels: bounded memory on a cold cache, loaded (not recompiled) by later processes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from qoda.quant.kernels.warmup import announce_if_slow

_CHILD = """
import json, resource, time
from qoda.quant.kernels import message
from qoda.quant.kernels.warmup import warm_up
def peak_mib():
    # VmHWM is this process's own peak: getrusage's ru_maxrss keeps the high-water mark of the
    # address space exec replaced (vfork shares the parent's), so under a big pytest parent it
    # reports the parent's size.
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.process_time()
warm_up(("fixed",), (True,))
kernels = (message.encode_message, *message._DECODE_MESSAGE)
print(json.dumps({
    "cpu": time.process_time() - t,
    "rss_mib": peak_mib(),
    "compiled": sum(sum(k.stats.cache_misses.values()) for k in kernels),
    "loaded": sum(sum(k.stats.cache_hits.values()) for k in kernels),
}))
"""


def _child(cache: Path) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cold_compile_is_bounded_and_later_processes_load_the_cache(tmp_path):
    """The fused kernels of a training job compiled from a cold cache in bounded memory (it
    took 2.9 GB and ~160 s of CPU when numba inlined every decoder into one function), and a
    process started afterwards only loads them (what ``qoda train``'s workers do)."""
    cold = _child(tmp_path)
    assert cold["compiled"] == 2 and cold["loaded"] == 0  # the encoder and one decoding mode
    assert cold["rss_mib"] < 1024, cold
    assert cold["cpu"] < 100, cold  # ~20 s on one core; 160 s before
    warm = _child(tmp_path)
    assert warm["compiled"] == 0 and warm["loaded"] == 2, warm
    assert warm["cpu"] < cold["cpu"] / 2, (cold, warm)


def test_announce_if_slow_speaks_only_when_slow():
    lines: list[str] = []
    with announce_if_slow("compiling...", lines.append, after=5.0):
        pass
    assert lines == []
    with announce_if_slow("compiling...", lines.append, after=0.05):
        time.sleep(0.3)
    assert lines[0] == "compiling..." and lines[1].startswith("compiling: done in ")
