"""The same weights behind LitServe, as its README writes a server (``ts-bench``'s third system).

    python -m tools.baselines.litserve_app --kind tabular --model-file examples/net/models/net.py \\
        --class Net --weights examples/net/artifacts/net.pt --port 8000

tabular: POST {"inputs": [10 numbers]} -> {"predictions": [[y]]};
digits:  POST {"image": "<base64 PNG>"} -> top-3 classes (LitServe decodes JSON bodies only).
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


def _load(model_file: Path, class_name: str, weights: Path) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("_litserve_model", model_file)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    model = getattr(module, class_name)()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


class ServedAPI(ls.LitAPI):
    def __init__(self, kind: str, model_file: Path, class_name: str, weights: Path) -> None:
        super().__init__()
        self.kind, self.model_file, self.class_name, self.weights = kind, model_file, class_name, weights

    def setup(self, device):
        torch.set_num_threads(1)
        self.model = _load(self.model_file, self.class_name, self.weights)

    def decode_request(self, request):
        if self.kind == "tabular":
            return torch.tensor([request["inputs"]], dtype=torch.float32)
        image = ImageOps.invert(Image.open(io.BytesIO(base64.b64decode(request["image"]))).convert("L"))
        box = image.getbbox() or (0, 0, image.width, image.height)
        grid = image.crop(box).resize((8, 8), Image.Resampling.BOX)
        return torch.tensor(list(grid.getdata()), dtype=torch.float32).reshape(1, 1, 8, 8) / 255.0

    def predict(self, x):
        with torch.inference_mode():
            return self.model(x)

    def encode_response(self, output):
        if self.kind == "tabular":
            return {"predictions": output.tolist()}
        top = torch.softmax(output, dim=1).topk(3, dim=1)
        return {"predictions": [{"class": str(i), "probability": p} for i, p in zip(top.indices[0].tolist(), top.values[0].tolist(), strict=True)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["tabular", "digits"], required=True)
    parser.add_argument("--model-file", type=Path, required=True)
    parser.add_argument("--class", dest="class_name", required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--api-servers", type=int, default=2)
    args = parser.parse_args()
    api = ServedAPI(args.kind, args.model_file.resolve(), args.class_name, args.weights.resolve())
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, timeout=30)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=args.api_servers, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
