"""SpokenDigitNet: a small CNN over log-mel features, one class per spoken digit whatever the language.

It takes what the library's ``audio_classifier`` makes with ``features: log_mel``:
``[batch, n_mels, frames]``. Each clip's features are centred and scaled to unit variance first
(over all bands and frames), so a louder or quieter recording gives the same input.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.BatchNorm2d(channels_out), nn.ReLU(), nn.MaxPool2d(2))


class SpokenDigitNet(nn.Module):
    def __init__(self, channels: int = 16, classes: int = 10, dropout: float = 0.3) -> None:
        super().__init__()
        self.body = nn.Sequential(_block(1, channels), _block(channels, 2 * channels), _block(2 * channels, 4 * channels), _block(4 * channels, 4 * channels))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(4 * channels, classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        centred = features - features.mean(dim=(1, 2), keepdim=True)
        scaled = centred / (centred.std(dim=(1, 2), keepdim=True) + 1e-5)
        hidden = self.body(scaled.unsqueeze(1))
        return self.head(self.dropout(hidden.mean(dim=(2, 3))))
