"""qoda's DDP hook in the trainers users already have.

* :mod:`qoda.integrations.lightning` - ``QodaDDPStrategy`` (a Lightning ``DDPStrategy`` that
  registers the hook on every device, CPU/gloo included, and checkpoints its state) and
  ``QodaHookCallback`` (the same for an existing strategy).
* :mod:`qoda.integrations.accelerate` - ``register_qoda_hook(accelerator, model, state)``
  after ``accelerator.prepare()``; the state is saved by ``accelerator.save_state``.

Each submodule imports its framework; importing this package imports neither.
"""
