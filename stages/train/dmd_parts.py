"""The parts of ``dmd-distill`` (DMD / DMD2) that do not depend on the teacher's kind: the
distribution-matching gradient, the denoising target of the fake score network, the GAN
classifier head on the fake network's middle block, and the generator's chain.

Notation: a teacher or fake score network gives x0 predictions mu(x_t, t); x the
generator's sample, x_t = alpha_t x + sigma_t eps.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from pipelines.errors import bad_value

GAN_BLOCK = "mid_block"  # where DMD2's classifier head reads the fake network's features


def dmd_loss(x: torch.Tensor, mu_real: torch.Tensor, mu_fake: torch.Tensor) -> torch.Tensor:
    """DMD's generator loss (Yin et al. 2023, eq. 7-8): with the per-sample normaliser
    w = mean over pixels of |x - mu_real|, grad = (mu_fake - mu_real) / w, and
    L = 0.5 ||x - stopgrad(x - grad)||^2 (mean), whose gradient in x is grad."""
    dims = tuple(range(1, x.ndim))
    weight = (x.detach() - mu_real).abs().mean(dim=dims, keepdim=True).clamp(min=1e-6)
    grad = torch.nan_to_num((mu_fake - mu_real) / weight)
    return 0.5 * F.mse_loss(x, (x.detach() - grad).detach())


def denoising_target(prediction: str, a, s, x0, eps) -> torch.Tensor:
    """The network's training target under its prediction type (the fake score network
    learns the generator's distribution with the teacher's own loss)."""
    if prediction == "epsilon":
        return eps
    if prediction == "v_prediction":
        return a * eps - s * x0
    if prediction == "flow":
        return eps - x0
    return x0  # sample


class GANHead(torch.nn.Module):
    """DMD2's classifier on the fake score network's bottleneck: conv, SiLU, global
    average pooling, one logit."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(channels, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(1)


def gan_channels(net, where: str) -> int:
    """The width of the block the head attaches to; a denoiser without it is an error
    naming the blocks it has."""
    block = getattr(net, GAN_BLOCK, None)
    if block is None:
        raise bad_value(where, "gan_weight", "> 0", f"0 for a {type(net).__name__}: the GAN "
                        f"head reads the '{GAN_BLOCK}' output, and this denoiser's blocks "
                        f"are {[n for n, _ in net.named_children()]}")
    channels = getattr(net.config, "block_out_channels", None)
    return int(channels[-1]) if channels else int(next(block.parameters()).shape[0])


@contextlib.contextmanager
def middle_features(net):
    """Collects the ``mid_block`` output of the (possibly DDP-wrapped) net while open."""
    module = getattr(getattr(net, "module", net), GAN_BLOCK)
    found = []
    handle = module.register_forward_hook(
        lambda m, i, out: found.append(out[0] if isinstance(out, tuple) else out))
    try:
        yield found
    finally:
        handle.remove()


class Frozen:
    """A (possibly DDP-wrapped) module called with its parameters detached: gradients
    reach its inputs only. The generator's GAN term goes through the fake network and
    the head this way, so its backward neither touches the discriminator's parameters
    nor fires their DDP hooks a second time in the step (the fake loss's backward does)."""

    def __init__(self, module):
        self.module = getattr(module, "module", module)
        self.params = {k: v.detach() for k, v in self.module.named_parameters()}

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.module, self.params, args, kwargs)

    def __getattr__(self, name):  # the module's own attributes (config and the like)
        return getattr(self.module, name)


def gan_losses(logits_real, logits_fake_detached, logits_fake) -> tuple:
    """Non-saturating GAN: (discriminator loss, generator loss)."""
    d = F.softplus(-logits_real).mean() + F.softplus(logits_fake_detached).mean()
    return d, F.softplus(-logits_fake).mean()


def chain_covers(chain: list[float]) -> dict[str, list[float]]:
    """The step counts a k-step chain serves: its n-step sub-chains chain[::k // n] for
    every n dividing k (the first step, from pure noise, is always trained)."""
    k = len(chain)
    return {str(n): [float(t) for t in chain[::k // n]] for n in range(1, k + 1) if k % n == 0}


def backward_simulation(chain, x_t0, generate, renoise, gen) -> tuple[torch.Tensor, float]:
    """DMD2 Sec. 4.4: the generator's input at a random step i of its own chain, made by
    running the chain from pure noise without gradients (``generate(x, t)`` -> x0,
    ``renoise(x0, t)`` -> x_t). Returns (x at chain[i], chain[i])."""
    i = int(torch.randint(0, len(chain), (1,), generator=gen))
    x = x_t0
    with torch.no_grad():
        for j in range(i):
            x = renoise(generate(x, chain[j]), chain[j + 1])
    return x, chain[i]
