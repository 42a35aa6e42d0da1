"""SentenceEncoder / SentenceDataModule on a tiny random BERT, every callback on it with a real Trainer, and one
short smoke test of the real pretrained all-MiniLM-L6-v2 (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything
from torch import nn

pytest.importorskip("transformers")
from lightning_compress import (  # noqa: E402
    CompressionMonitor,
    GradualPruning,
    KnowledgeDistillation,
    LowRankFactorization,
    QuantizationAwareTraining,
    SlimmableTraining,
    WeightSharing,
)
from lightning_compress.examples import SentenceDataModule, SentenceEncoder  # noqa: E402
from lightning_compress.examples.sentence import build_bert, retrieval_agreement  # noqa: E402

TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
LINEARS = [f"bert.encoder.layer.{i}.{n}" for i in range(2) for n in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense")]


@pytest.fixture(scope="module")
def data() -> SentenceDataModule:
    dm = SentenceDataModule(batch_size=16, max_length=16, max_sentences=160, config=TINY)
    dm.setup("fit")
    return dm


def _encoder(init_seed: int = 0, **kwargs) -> SentenceEncoder:
    seed_everything(0)
    return SentenceEncoder(config=TINY, init_seed=init_seed, lr=1e-3, max_length=16, **kwargs)


def test_split_is_fixed_disjoint_and_tokenized_once(data: SentenceDataModule) -> None:
    again = SentenceDataModule(max_sentences=160, val_fraction=0.1, test_fraction=0.1)
    assert again.split_sentences() == data.sentences
    splits = [set(data.sentences[k]) for k in ("train", "val", "test")]
    assert sum(map(len, splits)) == 160 and not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    assert len(splits[1]) == 16 == len(splits[2])
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (16, 16) and batch["target"].shape == (16, 32)
    torch.testing.assert_close(batch["target"].norm(dim=-1), torch.ones(16))
    sets = dict(data.sets)
    data.setup("test")  # a second setup reuses the tokens and targets
    assert all(data.sets[k] is sets[k] for k in sets)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (SentenceEncoder, dict(lr=0), "`lr` must be a number > 0, got 0"),
        (SentenceEncoder, dict(loss="l1"), "`loss` must be 'cosine' or 'mse', got 'l1'"),
        (SentenceEncoder, dict(config=TINY, depth=0), r"`depth` must be a fraction in \(0, 1\], got 0"),
        (SentenceEncoder, dict(config=TINY, dropout=1.0), r"`dropout` must be None or a number in \[0, 1\), got 1.0"),
        (SentenceEncoder, dict(config=TINY, depth_blocks="last"), "`depth_blocks` must be 'first' or 'spread', got 'last'"),
        (SentenceDataModule, dict(max_length=1), "`max_length` must be an int >= 2, got 1"),
        (SentenceDataModule, dict(val_fraction=0.5, test_fraction=0.5), "must be < 1"),
    ],
)
def test_errors(cls, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_original_scores_one_and_training_moves_towards_it(make_trainer, data: SentenceDataModule) -> None:
    assert make_trainer().validate(_encoder(), data, verbose=False)[0]["val/fidelity"] == pytest.approx(1.0, abs=1e-5)
    student = _encoder(init_seed=1)  # another random BERT: must learn the original's embeddings
    before = make_trainer().validate(student, data, verbose=False)[0]["val/fidelity"]
    make_trainer(max_steps=12, limit_val_batches=0).fit(student, data)
    after = make_trainer().validate(student, data, verbose=False)[0]
    assert after["val/fidelity"] > before + 0.05
    assert 0.0 <= after["val/retrieval"] <= 1.0


def test_dropout_setting_reaches_every_dropout_of_the_encoder(data: SentenceDataModule) -> None:
    batch = next(iter(data.train_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    kept = _encoder(dropout=None).train()  # the config's own 0.1: two training-mode forwards differ
    assert {m.p for m in kept.bert.modules() if isinstance(m, nn.Dropout)} == {0.1}
    assert not torch.allclose(kept(ids, mask), kept(ids, mask))
    off = _encoder(dropout=0.0).train()  # hidden and attention dropout off: training mode computes the eval output
    assert off.bert.config.attention_probs_dropout_prob == 0.0 == off.bert.config.hidden_dropout_prob
    with torch.no_grad():
        train_out = off(ids, mask)
        torch.testing.assert_close(train_out, off.eval()(ids, mask))


def test_retrieval_agreement_and_depth() -> None:
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    assert retrieval_agreement(x, x) == 1.0 == retrieval_agreement(3 * x, x) and retrieval_agreement(y, x) < 0.5
    shallow = SentenceEncoder(config=dict(TINY, num_hidden_layers=4), depth=0.5)
    assert len(shallow.bert.encoder.layer) == 2 == shallow.bert.config.num_hidden_layers
    full = SentenceEncoder(config=dict(TINY, num_hidden_layers=4))
    spread = SentenceEncoder(config=dict(TINY, num_hidden_layers=4), depth=0.5, depth_blocks="spread")
    for got, want in zip(spread.bert.encoder.layer, [full.bert.encoder.layer[i] for i in (0, 3)], strict=True):
        torch.testing.assert_close(got.output.dense.weight, want.output.dense.weight)
    assert not torch.equal(spread.bert.encoder.layer[1].output.dense.weight, shallow.bert.encoder.layer[1].output.dense.weight)


def _tied() -> SentenceEncoder:
    """ALBERT-style sharing: one query weight in both layers."""
    m = _encoder(init_seed=1)
    m.bert.encoder.layer[1].attention.self.query.weight = m.bert.encoder.layer[0].attention.self.query.weight
    return m


def _sparsity(m: SentenceEncoder) -> float:
    weights = {id(p): p for n, p in m.named_parameters() if n.endswith("weight") and "encoder" in n and p.dim() == 2}
    return sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())


CASES = {
    "pruning": (_encoder, lambda: [GradualPruning(final_sparsity=0.5, start_step=0, end_step=4, update_every=1)],
                lambda m: _sparsity(m) == pytest.approx(0.5, abs=0.01)),
    "pruning_embeddings_and_tied": (
        _tied, lambda: [GradualPruning(final_sparsity=0.5, start_step=0, end_step=4, update_every=1,
                                       targets=["re:.*embeddings", "re:.*(query|key|value|dense)"])],
        lambda m: (m.bert.encoder.layer[1].attention.self.query.weight is m.bert.encoder.layer[0].attention.self.query.weight
                   and float((m.bert.embeddings.word_embeddings.weight == 0).float().mean()) > 0.3)),
    "qat_w8a8": (_encoder, lambda: [QuantizationAwareTraining(weight_bits=8, activation_bits=8)],
                 lambda m: all(type(m.get_submodule(n)).__name__ == "Int8Linear" for n in LINEARS)),
    "qat_w4_tied": (  # a weight used by two layers is left float (with a warning); all others are quantized
        _tied, lambda: [QuantizationAwareTraining(weight_bits=4, activation_bits=None)],
        lambda m: [n for n in LINEARS if type(m.get_submodule(n)).__name__ == "Linear"]
        == [n for n in LINEARS if n.endswith("query")]),
    "low_rank_ffn": (_encoder, lambda: [LowRankFactorization(rank_ratio=0.25, start_step=2,
                                                             targets=["re:.*(intermediate|output)\\.dense"])],
                     lambda m: type(m.get_submodule("bert.encoder.layer.0.intermediate.dense")).__name__ == "LowRankLinear"),
    "weight_sharing_tied": (_tied, lambda: [WeightSharing(bits=3, start_step=2, verbose=False)],
                            lambda m: all(m.get_submodule(n).weight.unique().numel() <= 8 for n in LINEARS)),
    "monitor": (_encoder, lambda: [CompressionMonitor()], lambda m: True),
    "kd_cosine_from_original": (
        _encoder, lambda: [KnowledgeDistillation(teacher=SentenceEncoder(config=TINY), loss="cosine", alpha=0.5,
                                                 feature_pairs={"bert.encoder.layer.1.output.LayerNorm":
                                                                "bert.encoder.layer.1.output.LayerNorm"})],
        lambda m: True),
    "kd_hf_kwargs_and_output_object": (
        _encoder, lambda: [KnowledgeDistillation(teacher=build_bert(TINY), student_module="bert", loss="mse",
                                                 student_output="last_hidden_state",
                                                 teacher_output="last_hidden_state")],
        lambda m: True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_callback_runs_on_a_tiny_bert(make_trainer, data: SentenceDataModule, name: str) -> None:
    make, callbacks, reached = CASES[name]
    model = make()
    trainer = make_trainer(max_steps=6, limit_val_batches=1, callbacks=callbacks())
    trainer.fit(model, data)
    if name.startswith("kd"):
        assert float(trainer.callback_metrics["distill/kd_loss"]) > 0
    result = trainer.test(model, data, verbose=False)[0]
    assert 0.0 < result["test/fidelity"] <= 1.0 + 1e-5
    assert reached(model)


def test_slimmable_refuses_hf_bert_in_setup(make_trainer, data: SentenceDataModule) -> None:
    """Width switching needs a torch.fx trace, which HF BERT's forward does not give: a clear error, no training."""
    model = _encoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot trace SentenceEncoder.forward with torch.fx"):
        make_trainer(max_steps=1, callbacks=[SlimmableTraining(widths=[0.5, 1.0])]).fit(model, data)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_core_package_does_not_import_transformers() -> None:
    """``transformers`` is imported inside functions only, and ``examples`` loads ``sentence`` on first access.

    (A run with transformers hidden cannot show it here: torchmetrics and lightning import it when installed.)"""
    import ast

    import lightning_compress.examples as ex

    def top_level_imports(path: Path) -> set[str]:
        names = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names.add(node.module or "")
        return names

    root = Path(ex.__file__).parent
    assert not any(n.startswith(("transformers", "gt_all")) for n in top_level_imports(root / "sentence.py"))
    assert "lightning_compress.examples.sentence" not in top_level_imports(root / "__init__.py")
    assert ex.SentenceEncoder is SentenceEncoder and "SentenceDataModule" in dir(ex)
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        ex.Nope  # noqa: B018


def test_pretrained_is_found_offline() -> None:
    from lightning_compress.examples.sentence import pretrained_dir

    d = pretrained_dir()
    assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()


@pytest.mark.slow
def test_pretrained_minilm_smoke(make_trainer) -> None:
    """The real all-MiniLM-L6-v2 (22.7M parameters): loads offline, scores 1.0 against itself, two QAT steps."""
    dm = SentenceDataModule(batch_size=16, max_length=16, max_sentences=48)
    model = SentenceEncoder(max_length=16)
    assert sum(p.numel() for p in model.parameters()) > 22_000_000
    assert make_trainer().validate(model, dm, verbose=False)[0]["val/fidelity"] == pytest.approx(1.0, abs=1e-4)
    trainer = make_trainer(max_steps=2, limit_val_batches=0, callbacks=[QuantizationAwareTraining()])
    trainer.fit(model, dm)
    assert trainer.test(model, dm, verbose=False)[0]["test/fidelity"] > 0.9
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, nn.Module)
