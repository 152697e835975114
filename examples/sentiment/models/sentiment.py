"""SentimentBag: a bag of word-piece embeddings with a lexicon, for one-sentence reviews.

It takes what every Hugging Face text model takes, ``forward(input_ids, attention_mask)``, so the
library's built-in ``text_classifier`` serves it without a handler of its own. Each token's
embedding row holds ``dim`` features (averaged and max-pooled over the text, then a Linear layer)
and one score per class (summed over the text: a lexicon, which ``train.py`` starts from naive
Bayes log-probabilities). Explanations attribute the ``embedding`` layer.
"""

from __future__ import annotations

import torch
from torch import nn


class SentimentBag(nn.Module):
    def __init__(self, vocab_size: int = 8000, dim: int = 64, classes: int = 2, dropout: float = 0.3) -> None:
        super().__init__()
        self.dim = dim
        self.embedding = nn.Embedding(vocab_size, dim + classes, padding_idx=0)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(2).to(torch.float32)
        rows = self.embedding(input_ids) * mask
        features, lexicon = rows[..., : self.dim], rows[..., self.dim :]
        mean = features.sum(1) / mask.sum(1).clamp(min=1.0)
        peak = features.masked_fill(mask == 0, -1e4).amax(1)
        return self.fc(self.dropout(torch.cat([mean, peak], 1))) + lexicon.sum(1)
