"""The built-in text classifier, on a user's own BERT-style model packed from a folder of its own.

The model takes ``input_ids, attention_mask, token_type_ids`` and returns a Hugging Face style
output object with ``.logits``; its tokenizer is a WordPiece ``tokenizer.json`` with BERT's
``[CLS] ... [SEP]`` template, trained here on a few sentences. Every answer is checked against the
same tokenizer and model run here, outside the archive.
"""

from __future__ import annotations

import json
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

import serveready
from serveready.archiver import ArchiverError, build, load_spec
from serveready.handlers import ModelLoadError
from serveready.handlers.text_classifier import load_tokenizer

tokenizers = pytest.importorskip("tokenizers")

MODEL = '''"""A BERT-style classifier of a user's: word, position and token-type embeddings, one encoder layer."""
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Output:
    logits: torch.Tensor


class Embeddings(nn.Module):
    def __init__(self, vocab: int, dim: int, positions: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim, padding_idx=0)
        self.position_embeddings = nn.Embedding(positions, dim)
        self.token_type_embeddings = nn.Embedding(2, dim)

    def forward(self, input_ids, token_type_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)


class TinyBert(nn.Module):
    def __init__(self, vocab: int = 200, dim: int = 16, positions: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.embeddings = Embeddings(vocab, dim, positions)
        self.layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.layer(self.embeddings(input_ids, token_type_ids), src_key_padding_mask=attention_mask == 0)
        return Output(self.classifier(hidden[:, 0]))
'''

SENTENCES = [
    "the film was wonderful and moving", "a dull and tedious mess", "great acting, a great story",
    "the plot made no sense at all", "i loved every minute of it", "boring, slow and far too long",
    "an ordinary film with a few good scenes", "the music and the camera work are superb",
]
CLASSES = ("negative", "neutral", "positive")
MAX_LENGTH = 24


@dataclass(frozen=True)
class TextProject:
    folder: Path
    archive: Path
    model: torch.nn.Module
    tokenizer: object


def _tokenizer() -> object:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(SENTENCES, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))])
    return tokenizer


def text_project(base: Path, handler: dict | None = None) -> TextProject:
    folder = base / "user"
    (folder / "models").mkdir(parents=True)
    (folder / "model_configs").mkdir()
    (folder / "models" / "tiny_bert.py").write_text(MODEL)
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    tokenizer = _tokenizer()
    (folder / "tokenizer.json").write_text(tokenizer.to_str())
    namespace: dict = {}
    exec(compile(MODEL, "tiny_bert.py", "exec"), namespace)  # noqa: S102  (the reference model, outside the archive)
    torch.manual_seed(3)
    model = namespace["TinyBert"](vocab=tokenizer.get_vocab_size()).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(5.0)
    torch.save(model.state_dict(), folder / "tiny_bert.pt")
    config = {
        "name": "tinybert",
        "model": {"file": "models/tiny_bert.py", "class": "TinyBert", "kwargs": {"vocab": tokenizer.get_vocab_size()}, "sample_shape": [2, 8]},
        "weights": "tiny_bert.pt",
        "extra_files": ["tokenizer.json", "classes.txt"],
        "handler": {"entry": "text_classifier", "tokenizer": "tokenizer.json", "classes_file": "classes.txt", "max_length": MAX_LENGTH,
                    "max_texts": 4, "max_chars": 200, "top_k": 3, "embedding_layer": "embeddings.word_embeddings", "ig_steps": 200, **(handler or {})},
    }
    (folder / "model_configs" / "tinybert.yaml").write_text(yaml.safe_dump(config))
    spec = load_spec(folder / "model_configs" / "tinybert.yaml")
    return TextProject(folder, build(spec, folder / "model_store"), model, tokenizer)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> TextProject:
    return text_project(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def served(project: TextProject, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    with serveready.load(project.archive, into=tmp_path_factory.mktemp("unpacked")) as model:
        yield model


def expected(project: TextProject, texts: list[str]) -> tuple[torch.Tensor, list]:
    """Probabilities computed here: the tokenizer file, truncated and padded, then the model itself."""
    tokenizer = load_tokenizer(project.folder / "tokenizer.json", MAX_LENGTH)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in encodings])
    with torch.inference_mode():
        logits = project.model(ids, torch.tensor([e.attention_mask for e in encodings]), torch.tensor([e.type_ids for e in encodings])).logits
    return torch.softmax(logits, dim=1), encodings


def _probabilities(predictions: list[dict]) -> list[float]:
    by_index = {p["index"]: p["probability"] for p in predictions}
    assert [p["class"] for p in predictions] == [CLASSES[p["index"]] for p in predictions]
    return [by_index[i] for i in range(len(CLASSES))]


def _post(model, body: object, content_type: str = "application/json", headers: dict | None = None):  # noqa: ANN001, ANN202
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return model.predict(data, content_type, headers or {})


def test_the_archive_names_the_three_inputs_and_declares_tokenizers(project: TextProject) -> None:
    with zipfile.ZipFile(project.archive) as archive:
        config = yaml.safe_load(archive.read("model-config.yaml"))
        assert archive.read("requirements.txt").decode().split() == ["tokenizers>=0.15"]
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    assert config["model"]["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest["model"]["requirementsFile"] == "requirements.txt"


def test_one_text_in_every_form_gets_the_models_own_probabilities(project: TextProject, served) -> None:  # noqa: ANN001
    text = "The film was wonderful, the music superb!"
    [want], _ = expected(project, [text])
    element = text.encode()
    header = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 4 + len(element)}}]}).encode()
    answers = {
        "json": _post(served, {"text": text}),
        "plain": _post(served, text.encode(), "text/plain"),
        "v1": _post(served, {"instances": [{"text": text}]}),
        "v2 json": _post(served, {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}),
        "v2 binary": served.predict(header + struct.pack("<I", len(element)) + element, "application/octet-stream",
                                    {"Inference-Header-Content-Length": str(len(header))}),
    }
    for form, answer in answers.items():
        assert answer.status == 200, (form, answer.body)
        document = json.loads(answer.body)
        if form.startswith("v2"):
            [output] = document["outputs"]
            assert output["name"] == "probabilities" and output["shape"] == [1, 3]
            got = output["data"]
        else:
            predictions = document["predictions"]
            got = _probabilities(predictions[0] if form == "v1" else predictions)
        torch.testing.assert_close(torch.tensor(got), want, rtol=1e-5, atol=1e-6, msg=form)


def test_several_texts_answer_in_order_and_match_each_alone(project: TextProject, served) -> None:  # noqa: ANN001
    texts = ["a dull mess", "i loved every minute of this wonderful, moving film", "boring"]
    want, _ = expected(project, texts)
    answer = _post(served, {"inputs": texts, "k": 2})
    assert answer.status == 200
    rows = json.loads(answer.body)["predictions"]
    assert [len(r) for r in rows] == [2, 2, 2] and "truncated" not in json.loads(answer.body)
    for row, probabilities in zip(rows, want, strict=True):
        assert row[0]["index"] == int(probabilities.argmax()) and abs(row[0]["probability"] - float(probabilities.max())) < 1e-5
    # The same texts as separate requests of one batch: padding to the batch's longest changes nothing.
    batch = served.predict_batch([(json.dumps({"text": t}).encode(), "application/json", {}) for t in texts])
    for answer, probabilities in zip(batch, want, strict=True):
        torch.testing.assert_close(torch.tensor(_probabilities(json.loads(answer.body)["predictions"])), probabilities, rtol=1e-5, atol=1e-6)


def test_text_beyond_max_length_is_cut_and_the_answer_says_so(project: TextProject, served) -> None:  # noqa: ANN001
    long = "great acting " * 12  # 24 words: more than 24 tokens with [CLS] and [SEP], fewer than 200 characters
    [want], [encoding] = expected(project, [long])
    assert len(encoding.ids) == MAX_LENGTH
    one = json.loads(_post(served, {"text": long}).body)
    assert one["truncated"] is True
    torch.testing.assert_close(torch.tensor(_probabilities(one["predictions"])), want, rtol=1e-5, atol=1e-6)
    several = json.loads(_post(served, {"inputs": ["short", long]}).body)
    assert several["truncated"] == [False, True]
    assert json.loads(_post(served, {"instances": [long]}).body)["truncated"] == [True]


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        ({"text": ""}, "application/json", "'text' is empty"),
        ({"text": "   \n"}, "application/json", "'text' is empty"),
        ({"text": 7}, "application/json", "'text' must be a text (a string), got a number"),
        ({"inputs": ["fine", None]}, "application/json", "text 1 must be a text (a string), got null"),
        ({"inputs": []}, "application/json", "'inputs' must be a non-empty list of texts"),
        ({"inputs": ["a"] * 5}, "application/json", "'inputs' has 5 texts, more than the limit of 4 per request"),
        ({"text": "x" * 201}, "application/json", "'text' has 201 characters, more than the limit of 200"),
        ({"text": "bad \ud800 surrogate"}, "application/json", "'text' is not valid Unicode: a lone surrogate at character 4"),
        ({"text": "fine", "k": 4}, "application/json", "k must be a whole number from 1 to 3, got 4"),
        ({"words": "fine"}, "application/json", 'send a text/plain body, or JSON {"text": "..."}'),
        (b"caf\xe9 au lait", "text/plain", "the body is not UTF-8 text: invalid continuation byte at byte 3"),
        (b"", "text/plain", "the body is empty"),
        ({"instances": [3]}, "application/json", "instance 0 must be a text (a string), got a number"),
        ({"instances": ["a"] * 5}, "application/json", '"instances" has 5 entries, more than the limit of 4'),
        ({"inputs": [{"name": "t", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}, "application/json", "a text model takes texts: send a BYTES tensor"),
        ({"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": [""]}]}, "application/json", "v2: input 't': instance 0 is empty"),
    ],
)
def test_bad_texts_get_400_naming_the_problem(served, body: object, content_type: str, message: str) -> None:  # noqa: ANN001
    answer = _post(served, body, content_type)
    assert answer.status == 400, answer.body
    assert message in json.loads(answer.body).get("message", json.loads(answer.body).get("error", "")), answer.body


def test_non_utf8_v2_binary_bytes_get_400_and_only_that_request_fails(served) -> None:  # noqa: ANN001
    element = b"\xff\xfe bad"
    header = json.dumps({"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 4 + len(element)}}]}).encode()
    bad = (header + struct.pack("<I", len(element)) + element, "application/octet-stream", {"Inference-Header-Content-Length": str(len(header))})
    good = (json.dumps({"text": "wonderful"}).encode(), "application/json", {})
    replies = served.predict_batch([good, bad, good])
    assert [r.status for r in replies] == [200, 400, 200]
    assert "v2: input 't': instance 0 is not UTF-8 text" in json.loads(replies[1].body)["error"]


def test_explanations_give_one_attribution_per_token_that_add_up_to_the_logit(project: TextProject, served) -> None:  # noqa: ANN001
    text = "wonderful acting, a dull plot"
    _, [encoding] = expected(project, [text])
    answer = served.explain(json.dumps({"text": text}).encode(), "application/json")
    assert answer.status == 200, answer.body
    document = json.loads(answer.body)
    assert document["tokens"] == encoding.tokens and document["tokens"][0] == "[CLS]" and document["tokens"][-1] == "[SEP]"
    assert [tuple(o) for o in document["offsets"]] == list(encoding.offsets)
    assert len(document["attributions"]) == len(encoding.tokens)
    # Completeness of integrated gradients: the attributions add up to the predicted class's logit
    # minus its logit on the baseline (every ordinary token replaced by [PAD], [CLS] and [SEP] kept).
    ids = torch.tensor([encoding.ids])
    baseline = torch.tensor([[i if t in ("[CLS]", "[SEP]") else 0 for i, t in zip(encoding.ids, encoding.tokens, strict=True)]])
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    with torch.inference_mode():
        target = int(project.model(ids, mask, types).logits.argmax())
        gap = float(project.model(ids, mask, types).logits[0, target] - project.model(baseline, mask, types).logits[0, target])
    assert document["predictions"][0]["index"] == target
    assert abs(sum(document["attributions"]) - gap) < 0.02 * max(1.0, abs(gap))


def test_an_embedding_layer_the_model_lacks_is_named_on_explanation(tmp_path: Path) -> None:
    project = text_project(tmp_path, {"embedding_layer": "embedding"})
    with serveready.load(project.archive, into=tmp_path / "unpacked") as model:
        answer = model.explain(b'{"text": "fine"}', "application/json")
        assert answer.status == 501
        assert "handler.embedding_layer 'embedding' is not a layer of this model (its embedding layers: embeddings.word_embeddings" in json.loads(answer.body)["message"]
        assert model.predict(b'{"text": "fine"}', "application/json").status == 200


def test_a_host_without_tokenizers_is_told_what_to_install(project: TextProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers now raises ImportError
    with pytest.raises(ModelLoadError) as err:
        serveready.load(project.archive, into=tmp_path / "unpacked")
    assert "needs the tokenizers library on the serving host: pip install tokenizers" in err.value.message


@pytest.mark.parametrize(
    ("model", "handler", "message"),
    [
        ({"sample_shape": [2, 8, 1]}, {}, "model.sample_shape must be [batch, sequence] for text classifiers, got [2, 8, 1]"),
        ({"sample_shape": [2, 30]}, {}, "model.sample_shape [2, 30] is longer than handler.max_length 24"),
        ({}, {"max_length": 1}, "handler.max_length must be at least 2, got 1"),
        ({}, {"tokenizer": None}, "handler.tokenizer must be a non-empty string"),
    ],
)
def test_bad_text_configs_fail_the_build_naming_the_key(project: TextProject, model: dict, handler: dict, message: str) -> None:
    path = project.folder / "model_configs" / "tinybert.yaml"
    config = yaml.safe_load(path.read_text())
    config["model"].update(model)
    config["handler"].update(handler)
    broken = project.folder / "model_configs" / "broken.yaml"
    broken.write_text(yaml.safe_dump(config))
    try:
        with pytest.raises(ArchiverError) as err:
            load_spec(broken)
        assert message in err.value.message
    finally:
        broken.unlink()


def test_a_tokenizer_missing_from_the_archive_fails_the_build(project: TextProject, tmp_path: Path) -> None:
    config = yaml.safe_load((project.folder / "model_configs" / "tinybert.yaml").read_text())
    config["extra_files"] = ["classes.txt"]
    path = project.folder / "model_configs" / "notok.yaml"
    path.write_text(yaml.safe_dump({**config, "name": "notok"}))
    try:
        with pytest.raises(ArchiverError, match="handler.tokenizer tokenizer.json is not in the archive: add it to the config's extra_files"):
            build(load_spec(path), tmp_path / "store")
    finally:
        path.unlink()


def test_init_writes_a_text_config_that_builds_and_serves(project: TextProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from serveready.scripts.archive import main as ts_archive

    folder = tmp_path / "mine"
    (folder / "models").mkdir(parents=True)
    for name in ("models/tiny_bert.py", "tokenizer.json", "classes.txt", "tiny_bert.pt"):
        (folder / name).write_bytes((project.folder / name).read_bytes())
    monkeypatch.chdir(folder)
    vocab = project.tokenizer.get_vocab_size()
    args = ["init", "mybert", "--model-file", "models/tiny_bert.py", "--class", "TinyBert", "--input", "text", "--kwarg", f"vocab={vocab}",
            "--weights", "tiny_bert.pt", "--classes-file", "classes.txt"]
    assert ts_archive(args) == 0
    text = (folder / "model_configs" / "mybert.yaml").read_text()
    for line in ("entry: text_classifier", "extra_files: [tokenizer.json, classes.txt]", "tokenizer: tokenizer.json", "sample_shape: [2, 16]",
                 "# max_length: 128", "# embedding_layer: embedding"):
        assert line in text, line
    assert ts_archive(["build"]) == 0
    with serveready.load(folder / "model_store" / "mybert.mar", into=tmp_path / "unpacked") as model:
        answer = model.predict(b"a wonderful film", "text/plain")
    [want], _ = expected(project, ["a wonderful film"])
    torch.testing.assert_close(torch.tensor(_probabilities(json.loads(answer.body)["predictions"])), want, rtol=1e-5, atol=1e-6)
