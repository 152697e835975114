"""Every variant served side by side by a real TorchServe: same request, within its bound of fp32."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from serveready.scripts.runinfo import RunDir
from tests.conftest import VariantBuild, digits_model, digits_split, reference_net
from tests.e2e.conftest import Api, serving
from tests.e2e.test_serve import ts_manage

NAMES = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "model_configs").glob("*_*.yaml"))
ROWS = np.random.default_rng(7).normal(size=(16, 10)).astype(np.float32)
IMAGES = digits_split()["x_test"][:8]


@pytest.fixture(scope="module")
def variant_server(variant_builds: dict[str, VariantBuild], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunDir]:
    with serving([b.archive for b in variant_builds.values()], tmp_path_factory.mktemp("variants")) as run:
        yield run


@pytest.fixture(scope="module")
def variant_api(variant_server: RunDir) -> Api:
    return Api(variant_server)


@pytest.mark.parametrize("name", NAMES)
def test_variant_serves_within_its_bound(name: str, variant_builds: dict[str, VariantBuild], variant_server: RunDir, variant_api: Api, net_spec, digits_spec) -> None:  # noqa: ANN001
    build = variant_builds[name]
    done = ts_manage(variant_server, "register", f"{name}.mar", "--workers", "1")
    assert done.returncode == 0, done.stderr
    try:
        bound = build.spec.fidelity.max_abs_diff
        assert bound is not None, f"{name}.yaml sets no fidelity.max_abs_diff: nothing to hold it to"
        if build.row["base"] == "net":
            reply = variant_api.predict(name, json.dumps({"inputs": ROWS.tolist()}))
            assert reply.status_code == 200, reply.text
            assert np.abs(np.array(reply.json()["predictions"]) - reference_net(net_spec.weights, ROWS)).max() <= bound
            bad = variant_api.predict(name, '{"inputs": [1, 2, 3]}')
            assert bad.status_code == 400 and bad.json()["message"] == "row 0 has 3 values, expected 10"
        else:
            with torch.inference_mode():
                fp32 = torch.softmax(digits_model(digits_spec.weights)(IMAGES), dim=1).numpy()
            for image, expected in zip(IMAGES, fp32, strict=True):
                reply = variant_api.predict(name, json.dumps({"inputs": (image[0] * 16).tolist(), "k": 10}))
                assert reply.status_code == 200, reply.text
                served = {p["index"]: p["probability"] for p in reply.json()["predictions"]}
                assert np.abs(np.array([served[i] for i in range(10)]) - expected).max() <= bound
            bad = variant_api.predict(name, b"not an image", content_type="image/png")
            assert bad.status_code == 400 and "not a PNG or JPEG image" in bad.json()["message"]
    finally:
        ts_manage(variant_server, "unregister", name)
