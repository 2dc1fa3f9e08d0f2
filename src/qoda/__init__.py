"""qoda: layer-wise unbiased gradient quantization, compressed collectives and QODA.

Packages: ``quant`` (pure tensor maths), ``codec`` (wire format), ``comm`` (averaging over a
ProcessGroup, DDP hook), ``optim`` (VI / min-max optimizers), ``vi`` (monotone-VI suite),
``gan`` and ``lm`` (models), ``report`` and ``bench`` (jobs behind the ``qoda`` command).
"""

__version__ = "0.1.0"
