"""The multi-process runner of the tests (time-bounded gloo processes): :mod:`qoda.utils.procs`."""

from qoda.utils.procs import free_port, run, values

__all__ = ["free_port", "run", "values"]
