"""The same weights behind LitServe, as its README writes a server (``ts-bench``'s third system).

    python -m tools.baselines.litserve_app --kind tabular --model-file examples/net/models/net.py \\
        --class Net --weights examples/net/artifacts/net.pt --port 8000

tabular: POST {"inputs": [10 numbers]} -> {"predictions": [[y]]};
digits:  POST {"image": "<base64 PNG>"} -> top-3 classes (LitServe decodes JSON bodies only);
text:    POST {"text": "..."} -> top-2 classes (``--extra-file`` the tokenizer.json);
audio:   POST {"audio": "<base64 WAV>"} -> top-3 digits;
image:   POST {"image": "<base64 JPEG/PNG>"} -> top-5 of an ImageNet-style classifier (224x224).
The text and audio decoders are the stock TorchServe handlers' own (tools/baselines/stock_*.py).
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
from pathlib import Path

import litserve as ls
import torch
from PIL import Image, ImageOps

from . import stock_audio, stock_image, stock_text


def _load(model_file: Path, class_name: str, weights: Path) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("_litserve_model", model_file)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    model = getattr(module, class_name)()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


class ServedAPI(ls.LitAPI):
    def __init__(self, kind: str, model_file: Path, class_name: str, weights: Path, extra_files: list[Path]) -> None:
        super().__init__()
        self.kind, self.model_file, self.class_name, self.weights, self.extra_files = kind, model_file, class_name, weights, extra_files

    def setup(self, device):
        torch.set_num_threads(1)
        self.model = _load(self.model_file, self.class_name, self.weights)
        if self.kind == "text":
            self.tokenizer = stock_text.load_tokenizer(str(self.extra_files[0]))
        elif self.kind == "audio":
            self.bank = stock_audio.mel_bank()

    def decode_request(self, request):
        if self.kind == "tabular":
            return torch.tensor([request["inputs"]], dtype=torch.float32)
        if self.kind == "text":
            [encoding] = self.tokenizer.encode_batch([stock_text.text_of(request)])
            return torch.tensor([encoding.ids]), torch.tensor([encoding.attention_mask])
        if self.kind == "audio":
            return stock_audio.features(stock_audio.read_clip(base64.b64decode(request["audio"]))[None], self.bank)
        if self.kind == "image":
            return stock_image.to_input(base64.b64decode(request["image"]))[None]
        image = ImageOps.invert(Image.open(io.BytesIO(base64.b64decode(request["image"]))).convert("L"))
        box = image.getbbox() or (0, 0, image.width, image.height)
        grid = image.crop(box).resize((8, 8), Image.Resampling.BOX)
        return torch.tensor(list(grid.getdata()), dtype=torch.float32).reshape(1, 1, 8, 8) / 255.0

    def predict(self, x):
        with torch.inference_mode():
            return self.model(*x) if isinstance(x, tuple) else self.model(x)

    def encode_response(self, output):
        if self.kind == "tabular":
            return {"predictions": output.tolist()}
        if self.kind == "text":
            return {"predictions": stock_text.top_classes(output)[0]}
        if self.kind == "audio":
            return {"predictions": stock_audio.top_digits(output)[0]}
        if self.kind == "image":
            return {"predictions": stock_image.top5(output)[0]}
        top = torch.softmax(output, dim=1).topk(3, dim=1)
        return {"predictions": [{"class": str(i), "probability": p} for i, p in zip(top.indices[0].tolist(), top.values[0].tolist(), strict=True)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["tabular", "digits", "text", "audio", "image"], required=True)
    parser.add_argument("--model-file", type=Path, required=True)
    parser.add_argument("--class", dest="class_name", required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--extra-file", type=Path, action="append", default=[], help="a file the decoder reads (the text kind's tokenizer.json)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--api-servers", type=int, default=2)
    args = parser.parse_args()
    api = ServedAPI(args.kind, args.model_file.resolve(), args.class_name, args.weights.resolve(), [p.resolve() for p in args.extra_file])
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, timeout=30)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=args.api_servers, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
