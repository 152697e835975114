"""A small classifier for scikit-learn's breast-cancer table: 30 measurements in, 2 logits out.

The standardisation is part of the model (buffers saved in its state_dict), so a client
sends the raw measurements and the archive needs nothing but this file and torch.
"""

import torch
from torch import nn


class BreastCancerNet(nn.Module):
    """Standardise, then a 30 -> hidden -> 2 MLP; outputs are logits for (malignant, benign)."""

    def __init__(self, in_features: int = 30, hidden: int = 16) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        self.layers = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x - self.mean) / self.std)
