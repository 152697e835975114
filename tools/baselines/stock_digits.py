"""A stock-style TorchServe handler for ``digits``: PNG in, top-3 classes out.

The image becomes the 8x8 ink grid that scikit-learn's digits are made of (Pillow only),
as in TorchServe's image examples. Used by ``ts-bench`` as a baseline.
"""

import io

import torch
from PIL import Image, ImageOps
from ts.torch_handler.base_handler import BaseHandler


class StockDigitsHandler(BaseHandler):
    def initialize(self, context):
        # The hand-tuned baseline sets torch threads per worker in model-config.yaml's handler: section.
        threads = ((context.model_yaml_config or {}).get("handler") or {}).get("torch_threads")
        if threads:
            torch.set_num_threads(int(threads))
        super().initialize(context)

    def preprocess(self, data):
        grids = []
        for row in data:
            body = row.get("data") or row.get("body")
            image = ImageOps.invert(Image.open(io.BytesIO(body)).convert("L"))
            box = image.getbbox() or (0, 0, image.width, image.height)
            grid = image.crop(box).resize((8, 8), Image.Resampling.BOX)
            grids.append(torch.tensor(list(grid.getdata()), dtype=torch.float32).reshape(1, 8, 8) / 255.0)
        return torch.stack(grids)

    def postprocess(self, data):
        top = torch.softmax(data, dim=1).topk(3, dim=1)
        return [
            {"predictions": [{"class": str(i), "probability": p} for i, p in zip(idx, prob, strict=True)]}
            for idx, prob in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        ]
