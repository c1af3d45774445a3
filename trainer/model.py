"""A little denoising MLP on synthetic data (no downloads): predicts the noise added to a clean sample."""

from __future__ import annotations

import math

import torch

DIM = 32


class Denoiser(torch.nn.Module):
    def __init__(self, dim: int = DIM, hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        self.in_proj = torch.nn.Linear(dim + 1, hidden)
        self.linear_1 = torch.nn.Linear(hidden, hidden)
        self.linear_2 = torch.nn.Linear(hidden, hidden)
        self.out_proj = torch.nn.Linear(hidden, dim)
        self.dropout = torch.nn.Dropout(dropout)  # uses the global RNG: a resume must restore it

    def forward(self, noisy, sigma):
        h = torch.nn.functional.silu(self.in_proj(torch.cat([noisy, sigma[:, None]], dim=1)))
        h = self.dropout(torch.nn.functional.silu(self.linear_1(h)))
        h = torch.nn.functional.silu(self.linear_2(h))
        return self.out_proj(h)


class SyntheticData:
    """A fixed dataset of smooth curves; each epoch's order is a permutation seeded by (seed, epoch), so the batch for
    any step is known without saving sampler state."""

    def __init__(self, seed: int, size: int = 1024, dim: int = DIM):
        gen = torch.Generator().manual_seed(seed)
        t = torch.linspace(0, 2 * math.pi, dim)
        freq = torch.rand(size, 1, generator=gen) * 3 + 0.5
        phase = torch.rand(size, 1, generator=gen) * 2 * math.pi
        self.samples = torch.sin(freq * t + phase)
        self.seed = seed

    def batch(self, index: int, batch_size: int) -> tuple[torch.Tensor, int]:
        """The `index`-th batch of the endless epoch sequence, and its epoch."""
        per_epoch = len(self.samples) // batch_size
        epoch, position = divmod(index, per_epoch)
        order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        return self.samples[order[position * batch_size:(position + 1) * batch_size]], epoch


def lr_lambda(warmup: int, max_steps: int):
    """Linear warmup, then cosine decay to zero at max_steps."""
    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return schedule
