"""The sentiment example trained on the Rotten Tomatoes snippets (examples/sentiment/train.py) and served
by the built-in text classifier: the accuracy it promises, on the corpus and on reviews written apart from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import serveready
from serveready.archiver.training import metrics_path
from tests.conftest import sentiment_probabilities, sentiment_split

#: One-line reviews written for this test, independently of the corpus: plain and unambiguous.
POSITIVE = [
    "A wonderful film, I loved every minute of it.",
    "Brilliant acting and a beautiful story.",
    "One of the best movies I have seen this year.",
    "Funny, warm and moving from start to finish.",
    "A delightful surprise with a terrific cast.",
    "The director has made a smart, gripping thriller.",
    "I laughed and cried; a truly great movie.",
    "Gorgeous to look at and a joy to watch.",
    "An excellent, heartfelt drama.",
    "The performances are superb and the script is sharp.",
    "A charming, clever comedy for the whole family.",
    "This is a masterpiece.",
    "Thrilling, inventive and beautifully shot.",
    "A fresh and entertaining ride.",
    "Touching and powerful, it stays with you.",
    "The best animated film in years.",
    "Smart, funny and full of heart.",
    "A remarkable achievement, wonderfully acted.",
    "An engaging story told with real warmth.",
    "I enjoyed it immensely.",
]
NEGATIVE = [
    "A boring, tedious mess.",
    "The worst movie I have seen in years.",
    "Dull, predictable and far too long.",
    "The acting is terrible and the plot makes no sense.",
    "A waste of time and money.",
    "Lazy, stupid and painfully unfunny.",
    "I was bored from the first scene to the last.",
    "A clumsy, lifeless sequel.",
    "The script is awful and the jokes fall flat.",
    "An ugly, pointless film.",
    "Nothing works in this dreary drama.",
    "Flat characters and a dull story.",
    "It is a disaster from start to finish.",
    "Sloppy, loud and boring.",
    "A tiresome, empty thriller.",
    "Badly written and badly acted.",
    "The film is a mess and never recovers.",
    "Painfully slow and utterly forgettable.",
    "A disappointing, mediocre movie.",
    "Avoid this one; it is dreadful.",
]


def test_training_beats_75_percent_on_the_held_out_reviews(sentiment_spec, sentiment_archive: Path, tmp_path: Path) -> None:  # noqa: ANN001
    _, held_out = sentiment_split()
    metrics = json.loads(metrics_path(sentiment_spec.weights).read_text())
    assert metrics["heldout_rows"] == len(held_out) == 2561
    assert metrics["heldout_accuracy"] >= 0.75
    # The served archive on the held-out texts themselves (not their stored token ids): the same accuracy.
    texts, labels = [t for t, _ in held_out], torch.tensor([y for _, y in held_out])
    with serveready.load(sentiment_archive, into=tmp_path / "unpacked") as model:
        answers = [model.predict(json.dumps({"inputs": texts[i:i + 64], "k": 1}).encode(), "application/json") for i in range(0, len(texts), 64)]
    predicted = torch.tensor([row[0]["index"] for answer in answers for row in json.loads(answer.body)["predictions"]])
    assert (predicted == labels).float().mean().item() == pytest.approx(metrics["heldout_accuracy"], abs=0.002)


def test_plain_reviews_written_apart_from_the_corpus_are_80_percent_right(sentiment_archive: Path, tmp_path: Path) -> None:
    with serveready.load(sentiment_archive, into=tmp_path / "unpacked") as model:
        answer = model.predict(json.dumps({"inputs": POSITIVE + NEGATIVE, "k": 1}).encode(), "application/json")
    predicted = [row[0]["class"] for row in json.loads(answer.body)["predictions"]]
    truth = ["positive"] * len(POSITIVE) + ["negative"] * len(NEGATIVE)
    right = sum(p == t for p, t in zip(predicted, truth, strict=True))
    assert right / len(truth) >= 0.8, [(text, p) for text, p, t in zip(POSITIVE + NEGATIVE, predicted, truth, strict=True) if p != t]


def test_the_served_probabilities_are_the_models_own(sentiment_spec, sentiment_archive: Path, tmp_path: Path) -> None:  # noqa: ANN001
    texts = ["A wonderful film.", "A boring, tedious mess that goes on and on."]
    with serveready.load(sentiment_archive, into=tmp_path / "unpacked") as model:
        rows = json.loads(model.predict(json.dumps({"inputs": texts}).encode(), "application/json").body)["predictions"]
    for row, expected in zip(rows, sentiment_probabilities(sentiment_spec, texts), strict=True):
        assert [p["class"] for p in row] == (["positive", "negative"] if expected[1] > expected[0] else ["negative", "positive"])
        torch.testing.assert_close(torch.tensor([p["probability"] for p in sorted(row, key=lambda p: p["index"])]), expected, rtol=1e-5, atol=1e-6)
