"""Running a namespace benchmark in a test: skip where namespaces are unavailable, and check
that the benchmark removed every namespace and link it created."""

import subprocess
from collections.abc import Callable
from typing import Any

import pytest


def _state() -> tuple[str, str]:
    def out(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True).stdout

    return out("ip", "netns", "list"), out("ip", "-o", "link")


def run_cleanly(bench: Callable[[], Any]) -> Any:
    """``bench()``'s result; skips the test if namespaces cannot be built here."""
    from qoda.bench.netns import NetnsUnavailable, check_available

    try:
        check_available()
    except NetnsUnavailable as e:
        pytest.skip(str(e))
    before = _state()
    try:
        res = bench()
    except NetnsUnavailable as e:  # e.g. a container without CAP_NET_ADMIN
        pytest.skip(str(e))
    assert _state() == before  # namespaces and veth links removed
    return res
