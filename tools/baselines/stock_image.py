"""A stock-style TorchServe handler for an ImageNet-style classifier (``resnet18``): a JPEG/PNG in, top-5 classes out.

What TorchServe's ``image_classifier`` example does (``Resize(256)``, ``CenterCrop(224)``, ``ToTensor``,
``Normalize`` with ImageNet's statistics), written with Pillow and torch because this host has no
torchvision. Used by ``make bench`` as the compute-bound model's baseline.
"""

import io

import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).reshape(3, 1, 1)


def to_input(body: bytes) -> torch.Tensor:
    image = Image.open(io.BytesIO(body)).convert("RGB")
    w, h = image.size
    scale = 256 / min(w, h)
    image = image.resize((256, int(h * scale)) if w <= h else (int(w * scale), 256), Image.Resampling.BILINEAR)
    w, h = image.size
    left, top = int(round((w - 224) / 2.0)), int(round((h - 224) / 2.0))
    image = image.crop((left, top, left + 224, top + 224))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(224, 224, 3)
    return (pixels.permute(2, 0, 1).float() / 255.0 - MEAN) / STD


def top5(logits: torch.Tensor) -> list[list[dict]]:
    top = torch.softmax(logits, dim=1).topk(5, dim=1)
    return [[{"class": str(i), "probability": p} for i, p in zip(idx, prob, strict=True)]
            for idx, prob in zip(top.indices.tolist(), top.values.tolist(), strict=True)]


class StockImageHandler(BaseHandler):
    def initialize(self, context):
        threads = ((context.model_yaml_config or {}).get("handler") or {}).get("torch_threads")
        if threads:
            torch.set_num_threads(int(threads))
        super().initialize(context)

    def preprocess(self, data):
        return torch.stack([to_input(row.get("data") or row.get("body")) for row in data])

    def postprocess(self, data):
        return [{"predictions": answer} for answer in top5(data)]
