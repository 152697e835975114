"""A stock-style TorchServe handler for ``sentiment``: a text in, top-2 classes out.

What a TorchServe user writes without torchtext: the ``tokenizer.json`` from the archive's extra
files, read with Hugging Face ``tokenizers``, the batch padded to its longest text. Used by
``ts-bench`` as a baseline.
"""

import json
import os

import torch
from tokenizers import Tokenizer
from ts.torch_handler.base_handler import BaseHandler

CLASSES = ("negative", "positive")
TOKENIZER = "sentiment_tokenizer.json"


def text_of(body):
    """``{"text": ...}`` or the raw UTF-8 body."""
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8")
    if isinstance(body, str) and body.lstrip().startswith("{"):
        body = json.loads(body)
    return body["text"] if isinstance(body, dict) else body


def load_tokenizer(path, max_length=128):
    tokenizer = Tokenizer.from_file(path)
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=0)
    return tokenizer


def top_classes(logits, k=2):
    top = torch.softmax(logits, dim=1).topk(k, dim=1)
    return [[{"class": CLASSES[i], "index": i, "probability": p} for i, p in zip(idx, prob, strict=True)]
            for idx, prob in zip(top.indices.tolist(), top.values.tolist(), strict=True)]


class StockTextHandler(BaseHandler):
    def initialize(self, context):
        threads = ((context.model_yaml_config or {}).get("handler") or {}).get("torch_threads")
        if threads:
            torch.set_num_threads(int(threads))
        super().initialize(context)
        self.tokenizer = load_tokenizer(os.path.join(context.system_properties["model_dir"], TOKENIZER))

    def preprocess(self, data):
        encodings = self.tokenizer.encode_batch([text_of(row.get("data") or row.get("body")) for row in data])
        return torch.tensor([e.ids for e in encodings]), torch.tensor([e.attention_mask for e in encodings])

    def inference(self, data, *args, **kwargs):
        with torch.inference_mode():
            return self.model(*data)

    def postprocess(self, data):
        return [{"predictions": row} for row in top_classes(data)]
