"""TabularHandler as a TorchServe worker runs it (the archive's entry class, TorchServe's own Context), on a real unpacked archive."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from serveready.handlers.torchserve import TorchServeEntry
from tests.conftest import handled, reference_net, served


def _ready(net_dir: Path, batch: int) -> tuple[TorchServeEntry, object]:
    return served(net_dir, batch)


def _request(payload: object) -> dict:
    return {"body": json.dumps(payload).encode()}


def test_initialize_loads_eval_model_with_one_thread(net_dir: Path) -> None:
    handler, _ = _ready(net_dir, 1)
    assert handler.initialized and not handler.engine.model.training
    assert handler.engine.device == torch.device("cpu")
    assert torch.get_num_threads() == 1  # the archive's handler.torch_threads


def test_a_worker_of_batches_of_one_keeps_to_its_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch_threads beyond the share (cores / maxWorkers) hold for batches; a host that sends one request at a
    time (a plain TorchServe reading batchSize: 1) gets the share."""
    from serveready.handlers.runtime import worker_threads

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    two = {"minWorkers": 2, "maxWorkers": 2}
    assert worker_threads(two, None) == 1 and worker_threads({"maxWorkers": 1}, None) == 2
    assert worker_threads(two, 2, batch_size=4) == 2 and worker_threads(two, 2, batch_size=None) == 2
    assert worker_threads(two, 2, batch_size=1) == 1
    assert worker_threads({"maxWorkers": 1}, 2, batch_size=1) == 2  # within the share: as configured


def test_predictions_match_independent_numpy_forward(net_dir: Path) -> None:
    rows = np.random.default_rng(1).normal(size=(5, 10))
    handler, context = _ready(net_dir, 1)
    [answer] = handled(handler, [_request({"inputs": rows.tolist()})], context)
    expected = reference_net(net_dir / "net.pt", rows.astype(np.float32))
    np.testing.assert_allclose(answer["predictions"], expected, rtol=1e-5, atol=1e-5)
    assert context.get_response_status(0) == (200, None)


def test_single_row_answers_one_prediction(net_dir: Path) -> None:
    handler, context = _ready(net_dir, 1)
    [answer] = handled(handler, [{"body": {"inputs": [0.0] * 10}}], context)  # worker pre-decoded JSON
    assert len(answer["predictions"]) == 1 and len(answer["predictions"][0]) == 1


def test_batch_mixes_good_and_bad_requests_and_keeps_order(net_dir: Path) -> None:
    rng = np.random.default_rng(2)
    good = [rng.normal(size=(n, 10)) for n in (1, 3, 2)]
    batch = [
        _request({"inputs": good[0].tolist()}),
        {"body": b"not json"},
        _request({"inputs": good[1].tolist()}),
        _request({"inputs": [[1] * 10, [1] * 9]}),
        _request({"inputs": good[2].tolist()}),
    ]
    handler, context = _ready(net_dir, len(batch))
    answers = handled(handler, batch, context)
    assert len(answers) == len(batch)
    for idx, rows in zip((0, 2, 4), good, strict=True):
        np.testing.assert_allclose(answers[idx]["predictions"], reference_net(net_dir / "net.pt", rows.astype(np.float32)), rtol=1e-5, atol=1e-5)
        assert context.get_response_status(idx)[0] == 200
    assert answers[1] == {"code": 400, "type": "InvalidInput", "message": "request body is not valid JSON: Expecting value at line 1 column 1"}
    assert context.get_response_status(1) == (400, answers[1]["message"])
    assert answers[3]["message"] == "row 1 has 9 values, expected 10"
    assert context.get_response_status(3)[0] == 400


def test_all_bad_batch_runs_no_inference(net_dir: Path) -> None:
    handler, context = _ready(net_dir, 2)
    handler.engine.model = None  # inference would fail loudly if it were reached
    answers = handled(handler, [_request({}), _request({"inputs": []})], context)
    assert [a["code"] for a in answers] == [400, 400]


def test_inference_failure_is_generic_500_for_the_batch(net_dir: Path) -> None:
    from ts.utils.util import PredictionException

    handler, context = _ready(net_dir, 1)

    def broken(_: torch.Tensor) -> torch.Tensor:
        raise ValueError("secret internal detail")

    handler.engine.model = broken
    with pytest.raises(PredictionException) as err:
        handled(handler, [_request({"inputs": [0] * 10})], context)
    assert err.value.error_code == 500 and "secret" not in err.value.message


def test_too_many_rows_is_refused(net_dir: Path) -> None:
    handler, context = _ready(net_dir, 1)
    [answer] = handled(handler, [_request({"inputs": [[0] * 10] * 1025})], context)
    assert answer["message"] == "'inputs' has 1025 rows, more than the limit of 1024 rows per request"


def test_explanations_of_rows_add_up_to_the_output_change(net_dir: Path) -> None:
    """/explanations/net: Integrated Gradients per feature; Net is linear, so they are exact."""
    from ts.context import RequestProcessor

    rows = np.random.default_rng(5).normal(size=(2, 10)).astype(np.float32)
    handler, context = _ready(net_dir, 1)
    context.request_processor = [RequestProcessor({"explain": "True"})]
    [answer] = handled(handler, [_request({"inputs": rows.tolist()})], context)
    attributions = np.array(answer["attributions"])
    assert attributions.shape == (2, 10)
    baseline = reference_net(net_dir / "net.pt", np.zeros((1, 10), np.float32))
    np.testing.assert_allclose(attributions.sum(axis=1), (reference_net(net_dir / "net.pt", rows) - baseline)[:, 0], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(answer["predictions"], reference_net(net_dir / "net.pt", rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocked", ["captum", "matplotlib"])
def test_explanations_without_their_libraries_say_which_to_install(net_dir: Path, blocked: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host without captum, or with captum but without the matplotlib its captum.attr imports: 501 naming it."""
    import sys

    from ts.context import RequestProcessor

    for name in [m for m in sys.modules if m == "captum" or m.startswith(("captum.", f"{blocked}."))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, blocked, None)  # `import blocked` now raises ModuleNotFoundError
    handler, context = _ready(net_dir, 2)
    context.request_processor = [RequestProcessor({"explain": "True"}), RequestProcessor({})]
    explained, predicted = handled(handler, [_request({"inputs": [0.0] * 10}), _request({"inputs": [0.0] * 10})], context)
    assert explained["code"] == 501 and explained["message"].startswith(f"explanations need captum on the TorchServe host: pip install {blocked}")
    assert "predictions" in predicted  # the rest of the batch is answered


def test_a_fault_in_decoding_fails_that_request_alone(net_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handler, context = _ready(net_dir, 2)
    decode = handler.engine.handler.decode

    def flaky(request):  # noqa: ANN001, ANN202
        if request.body == b"boom":
            raise ValueError("a bug of ours, not the client's")
        return decode(request)

    monkeypatch.setattr(handler.engine.handler, "decode", flaky)
    bad, good = handled(handler, [{"body": b"boom"}, _request({"inputs": [0.0] * 10})], context)
    assert bad == {"code": 500, "type": "HandlerError", "message": "this request could not be decoded: internal error, see the model log"}
    assert context.get_response_status(0)[0] == 500 and "predictions" in good
