"""The training loop the PyTorch example models and the zoo's torch models share (torch only:
it runs in .venv-torch, which has no scikit-learn)."""

from __future__ import annotations

import torch
from torch import nn


def fit(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, epochs: int) -> nn.Module:
    """Adam with weight decay, batches of 64, gradients clipped to norm 1; returns the
    model in eval mode."""
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _epoch in range(epochs):
        model.train()
        order = torch.randperm(len(xs))
        for start in range(0, len(xs), 64):
            batch = order[start:start + 64]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(xs[batch]), ys[batch])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    model.eval()
    return model
