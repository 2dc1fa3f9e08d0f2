"""WGAN-GP as a two-player game: both players' gradients at the same point (the VI operator).

With critic ``D``, generator ``G``, real batch ``x`` and latents ``z``::

    L_D = E[D(G(z))] - E[D(x)] + lambda E[(||grad D(x_hat)||_2 - 1)^2]    (critic's loss)
    L_G = -E[D(G(z))]                                                       (generator's loss)
    V   = (grad_G L_G, grad_D L_D)                                          (the operator)

Both gradients are taken at the current parameters from one generated batch (one critic
forward on the fakes serves both losses), so the operator is evaluated at a single point as the
VI formulation requires; there is no DDP wrapper and hence no unused-parameter or double-hook
issue: the optimizer's averager exchanges the whole operator once per oracle call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from qoda.gan.models import gradient_penalty


@dataclass(frozen=True)
class GameLosses:
    critic: float  # L_D
    generator: float  # L_G
    wasserstein: float  # E[D(x)] - E[D(G(z))], the critic's estimate of W_1
    penalty: float


def wgan_gp_operator(
    generator: nn.Module, critic: nn.Module, real: torch.Tensor, z: torch.Tensor, gp_weight: float,
    rng: torch.Generator, update_generator: bool = True,
    on_generator_grads: Callable[[list[torch.Tensor]], None] | None = None,
) -> GameLosses:  # fmt: skip
    """Set ``.grad`` of every parameter of both players to ``V`` at the current point.

    ``update_generator=False`` (critic-only iterations when ``n_critic > 1``) sets the
    generator's component to zero.  The generator's component is computed first and handed to
    ``on_generator_grads`` (the trainer starts its exchange there, :mod:`qoda.comm.overlap`)
    before the critic's, whose gradient-penalty double backward is the costlier half.  The
    order does not change the values: both are gradients of fixed losses at one point.
    """
    g_params = [p for p in generator.parameters() if p.requires_grad]
    d_params = [p for p in critic.parameters() if p.requires_grad]
    fake = generator(z)
    out_fake = critic(fake).mean()
    out_real = critic(real).mean()
    gp = gradient_penalty(critic, real, fake.detach(), rng) if gp_weight > 0 else torch.zeros((), device=real.device)
    loss_d = out_fake - out_real + gp_weight * gp
    loss_g = -out_fake
    if update_generator:
        grads_g = [g.detach() for g in torch.autograd.grad(loss_g, g_params, retain_graph=True)]
    else:
        grads_g = [torch.zeros_like(p) for p in g_params]
    for p, g in zip(g_params, grads_g, strict=True):
        p.grad = g
    if on_generator_grads is not None:
        on_generator_grads(grads_g)
    grads_d = torch.autograd.grad(loss_d, d_params)
    for p, g in zip(d_params, grads_d, strict=True):
        p.grad = g.detach()
    return GameLosses(
        float(loss_d.detach()), float(loss_g.detach()), float((out_real - out_fake).detach()), float(gp.detach())
    )
