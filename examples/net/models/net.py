"""The article's regression network.

This file travels inside the model archive as its model file, so it imports
nothing but torch: a TorchServe host without this library can still load it.
"""

from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    """Two stacked linear layers, exactly as in the article: ``fc2(fc1(x))``."""

    def __init__(self, in_features: int = 10, hidden: int = 20) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))
