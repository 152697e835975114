"""``serveready.load``: an archive answering in-process, as a TorchServe worker would (tests/e2e/test_load.py holds
the answers to TorchServe's, byte for byte)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import serveready
from serveready.handlers.errors import ArchiveError, ModelLoadError
from serveready.handlers.host import frontend_error, torchserve_request
from tests.conftest import reference_net, render_digit, repack

ROW = [0.1, -0.2, 0.3, 0.0, 1.5, -1.0, 0.7, 0.2, -0.4, 0.9]


@pytest.fixture(scope="module")
def net(net_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> serveready.Model:
    model = serveready.load(net_archive, into=tmp_path_factory.mktemp("net"))
    yield model
    model.close()


def test_predict_answers_as_the_worker_does(net: serveready.Model, net_archive: Path) -> None:
    answer = net.predict(json.dumps({"inputs": ROW}).encode(), content_type="application/json")
    assert (answer.status, answer.content_type, answer.reason, answer.ok) == (200, "application/json", None, True)
    assert answer.body.startswith(b'{"predictions":[[') and b" " not in answer.body  # compact JSON bytes, as the handler sends them
    np.testing.assert_allclose(answer.json()["predictions"], reference_net(net.folder / "net.pt", np.array([ROW], np.float32)), rtol=1e-5)
    assert (net.name, net.version, net.runs_with) == ("net", "1.0", "torch float32 on cpu")
    bad = net.predict(b'{"inputs": [1, 2]}', "application/json")
    assert (bad.status, bad.reason) == (400, "row 0 has 2 values, expected 10")
    assert bad.json() == {"code": 400, "type": "InvalidInput", "message": "row 0 has 2 values, expected 10"}


def test_the_body_reaches_the_handler_as_torchserve_hands_it_over() -> None:
    """application/json decoded (bytes kept when it is not JSON), text/* as text, form bodies as fields, headers lower-case."""
    assert torchserve_request(b'{"a": 1}', "application/json; charset=utf-8").fields == {"body": {"a": 1}}
    assert torchserve_request(b"{not json", "application/json").fields == {"body": b"{not json"}
    assert torchserve_request(b"\xff", "text/plain").fields == {"body": b"\xff"}
    assert torchserve_request("héllo", "text/plain").fields == {"body": "héllo"}
    assert torchserve_request(b"\x89PNG", "image/png").fields == {"body": b"\x89PNG"}
    assert torchserve_request(b'{"a": 1}', None).fields == {"body": b'{"a": 1}'}
    assert torchserve_request(b"a=1&b=", "application/x-www-form-urlencoded").fields == {"a": b"1", "b": b""}
    multipart = (b'--X\r\nContent-Disposition: form-data; name="data"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n\x89PNG\r\n'
                 b'--X\r\nContent-Disposition: form-data; name="k"\r\n\r\n5\r\n--X--\r\n')
    assert torchserve_request(multipart, "multipart/form-data; boundary=X").fields == {"data": b"\x89PNG", "k": b"5"}
    request = torchserve_request({"inputs": ROW}, headers={"X-Top-K": "5", "explain": "True"})
    assert request.fields == {"body": {"inputs": ROW}} and request.headers["x-top-k"] == "5"
    assert request.headers["explain"] == "False" and not request.explain  # /predictions: TorchServe's own header wins
    assert torchserve_request(b"{}", "application/json", explain=True).explain


def test_form_bodies_get_the_400_that_says_which_header_to_send(net: serveready.Model) -> None:
    answer = net.predict(json.dumps({"inputs": ROW}).encode(), "application/x-www-form-urlencoded")
    assert answer.status == 400 and "Content-Type: application/json" in answer.json()["message"]


def test_predict_batch_answers_each_and_fails_bad_ones_alone(net: serveready.Model) -> None:
    rows = np.random.default_rng(4).normal(size=(3, 10)).astype(np.float32)
    answers = net.predict_batch([(json.dumps({"inputs": rows.tolist()}).encode(), "application/json"), (b"{}", "application/json"),
                                 ({"instances": rows.tolist()}, None, {"X-Request": "1"})])
    assert [a.status for a in answers] == [200, 400, 200]
    np.testing.assert_allclose(answers[0].json()["predictions"], answers[2].json()["predictions"], rtol=1e-6)
    assert answers[1].json()["message"].startswith("request body has no 'inputs' key")


def test_explain_answers_attributions(net: serveready.Model) -> None:
    answer = net.explain({"inputs": ROW})
    assert answer.status == 200 and set(answer.json()) == {"predictions", "attributions"} and len(answer.json()["attributions"][0]) == 10


def test_a_failed_batch_gets_torchservers_own_error_body(net: serveready.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_: torch.Tensor) -> torch.Tensor:
        raise ValueError("secret internal detail")

    monkeypatch.setattr(net.engine, "model", broken)
    [answer, other] = net.predict_batch([({"inputs": ROW}, None), ({"inputs": ROW}, None)])
    expected = b'{\n  "code": 500,\n  "type": "InternalServerException",\n  "message": "inference failed: internal error, see the model log"\n}\n'
    assert (answer.status, answer.content_type, answer.body) == (500, "application/json", expected) and other == answer
    assert frontend_error(413, "x").status == 507  # TorchServe maps 413 to 507


def test_several_threads_may_share_one_model(net: serveready.Model) -> None:
    results: list[int] = []

    def client() -> None:
        for _ in range(20):
            results.append(net.predict({"inputs": ROW}).status)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 80 and net.metrics()["serveready_batches_total"] >= 80


def test_a_closed_model_is_refused_and_its_folder_removed(net_archive: Path) -> None:
    with serveready.load(net_archive) as model:
        folder = model.folder
        assert (folder / "SHA256SUMS").is_file()
    assert not folder.exists()
    with pytest.raises(ModelLoadError, match="model net was closed"):
        model.predict({"inputs": ROW})


def test_changed_unsigned_or_foreign_archives_are_not_loaded(net_archive: Path, tmp_path: Path) -> None:
    from serveready.handlers.archive import generate_key

    def flip(entries: dict[str, bytes]) -> None:
        data = bytearray(entries["net.pt"])
        data[-40] ^= 1
        entries["net.pt"] = bytes(data)

    with pytest.raises(ArchiveError, match="net.mar failed its integrity check, not loaded: net.pt does not match its SHA-256"):
        serveready.load(repack(net_archive, tmp_path / "net.mar", flip, resum=False))
    _, public = generate_key(tmp_path / "key")
    copy = Path(shutil.copy(net_archive, tmp_path / "signed.mar"))
    with pytest.raises(ArchiveError, match="signed.mar is refused, not loaded: it is not signed"):
        serveready.load(copy, public_key=public)
    with pytest.raises(ModelLoadError, match="device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
        serveready.load(net_archive, device="tpu")


def test_images_and_their_headers(digits_archive: Path) -> None:
    with serveready.load(digits_archive, threads=0) as model:
        png = render_digit(np.eye(8) * 16, (40, 40))
        answer = model.predict(png, "image/png", {"X-Top-K": "5"})
        assert answer.status == 200 and len(answer.json()["predictions"]) == 5
        assert model.predict(b"\x00 not an image", "image/png").status == 400
        explained = model.explain(png, "image/png").json()
        assert np.array(explained["input"]).shape == np.array(explained["attributions"]).shape == (8, 8)
