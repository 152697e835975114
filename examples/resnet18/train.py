"""Seeded weights for the ResNet-18 layout: a compute-bound model for benchmarks and tuning, nothing downloaded.

``ts-archive train resnet18`` calls :func:`fit` (``training: {recipe: train.py:fit}``). There is no
task to learn offline at ImageNet's scale, and a serving benchmark only needs the computation: the
weights are He-initialised from the seed (as torchvision initialises a ResNet), then the batch-norm
statistics are set from a few batches of seeded noise images, so activations stay in range through
the 18 layers and the logits are finite and distinct. The same seed gives the same file.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from serveready.archiver import TrainingJob
from serveready.handlers import option


@dataclass(frozen=True, kw_only=True)
class Options:
    """``training:`` of resnet18.yaml."""

    seed: int = option(0, minimum=0, doc="seeds the weights and the calibration images")
    calibration_batches: int = option(4, minimum=1, doc="batches of noise images that set the batch-norm statistics")
    batch_size: int = option(8, minimum=1)


def fit(job: TrainingJob, options: Options) -> dict[str, float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order: one seed, one weights file
    torch.manual_seed(options.seed)
    try:
        model = job.build_model()
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        size = job.sample_shape[-1]
        gen = torch.Generator().manual_seed(options.seed)
        model.train()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None  # a plain average over the calibration batches
        with torch.no_grad():
            for i in range(options.calibration_batches):
                model(torch.randn(options.batch_size, 3, size, size, generator=gen))
                sys.stderr.write(f"\r  {job.name}: calibration batch {i + 1}/{options.calibration_batches}")
        sys.stderr.write("\n")
        model.eval()
        with torch.inference_mode():
            logits = model(torch.randn(2, 3, size, size, generator=gen))
    finally:
        torch.set_num_threads(threads)
    metrics = {"logit_std": float(logits.std()), "parameters": float(sum(p.numel() for p in model.parameters()))}
    job.save(model, metrics)
    return metrics
