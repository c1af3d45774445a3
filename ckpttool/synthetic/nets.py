"""The tiny network every synthetic checkpoint trains: a small MLP with an embedding and a head (tied, as language
models tie them, where asked), and a few real AdamW updates with a warm-up schedule on it."""

from __future__ import annotations

import torch


class TinyNet(torch.nn.Module):
    """A small MLP with a tied embedding/head pair, like language models have."""

    def __init__(self, width=16, tied=False):
        super().__init__()
        self.embed = torch.nn.Embedding(10, width)
        self.linear_1 = torch.nn.Linear(width, 32)
        self.linear_2 = torch.nn.Linear(32, width)
        self.head = torch.nn.Linear(width, 10, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(torch.relu(self.linear_2(torch.relu(self.linear_1(self.embed(x))))))


def trained(steps=3, seed=0):
    """Model, AdamW optimizer and LambdaLR scheduler after `steps` real updates."""
    torch.manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    for _ in range(steps):
        loss = model(torch.randint(0, 10, (4,))).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched
