"""A stock-style TorchServe handler for ``net``, as TorchServe's examples write one.

TorchServe's ``BaseHandler`` loads the model file and the state_dict; this file only turns
JSON rows into a tensor and the output back into JSON. Used by ``ts-bench`` as a baseline.
"""

import json

import torch
from ts.torch_handler.base_handler import BaseHandler


class StockTabularHandler(BaseHandler):
    def initialize(self, context):
        # The hand-tuned baseline sets torch threads per worker in model-config.yaml's handler: section.
        threads = ((context.model_yaml_config or {}).get("handler") or {}).get("torch_threads")
        if threads:
            torch.set_num_threads(int(threads))
        super().initialize(context)

    def preprocess(self, data):
        rows = []
        for row in data:
            body = row.get("data") or row.get("body")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            rows.append(body["inputs"])
        return torch.tensor(rows, dtype=torch.float32)

    def postprocess(self, data):
        return [{"predictions": [row]} for row in data.tolist()]
