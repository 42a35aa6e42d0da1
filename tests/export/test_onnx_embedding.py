"""``to_onnx(..., embeddings="int8")``: int8 per-row embedding tables, read back from the file and run in onnxruntime.

Tolerances, derived from the rounding bound: every table value moves by at most half its row's step ``s_r / 2``
(``s_r = max |w_r| / 127``). Through a Linear layer ``W`` that bounds output ``k`` of a token by
``sum_j |W_kj| s_r / 2`` exactly; through a BERT encoder, to first order, by ``sum_i |J_ki| (s_word + s_type) / 2``
with ``J`` the Jacobian of the output with respect to the token embeddings (word + token type are summed per token;
the bound allows 10 % for higher-order terms). Against the PyTorch model holding the dequantized tables the file is
a float graph: within ``FLOAT_RTOL`` (1e-4 of the output's magnitude), or ``ONNX_QUANT_RTOL`` with QAT layers.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from lightning_compress.export import to_onnx
from lightning_compress.export.onnx import ONNX_QUANT_RTOL
from lightning_compress.layers.quantization import QuantConfig, prepare_qat, set_qat_flags

transformers = pytest.importorskip("transformers")

FLOAT_RTOL = 1e-4


def _run(path: str | Path, x: torch.Tensor) -> torch.Tensor:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])


def _tables(path: str | Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i).copy() for i in onnx.load(str(path)).graph.initializer}


def _check_table(tables: dict[str, np.ndarray], name: str, weight: torch.Tensor) -> torch.Tensor:
    """The file's int8 table of ``name``: int8 codes, one step per row, within half a step of ``weight``; returns
    the dequantized table."""
    codes, steps = tables[f"{name}_int8"], tables[f"{name}_scale"]
    assert codes.dtype == np.int8 and codes.shape == tuple(weight.shape)
    assert steps.dtype == np.float32 and steps.shape == (weight.shape[0], 1)
    assert name not in tables  # the float table is gone
    w = weight.detach()
    amax = w.abs().amax(1, keepdim=True)
    torch.testing.assert_close(torch.from_numpy(steps)[amax[:, 0] > 0], (amax / 127)[amax[:, 0] > 0])
    deq = torch.from_numpy(codes).float() * torch.from_numpy(steps)
    assert bool(((deq - w).abs() <= torch.from_numpy(steps) / 2 + 1e-7).all())
    assert int(np.abs(codes).max(1).min()) == 127 or bool((amax == 0).any())  # each non-zero row spans +/-127
    return deq


def test_tiny_module_int8_table_within_the_row_step_bound(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vocab, dim = 200, 16
    net = nn.Sequential(nn.Embedding(vocab, dim, padding_idx=0), nn.Linear(dim, 4)).eval()
    ids = torch.randint(0, vocab, (2, 6))
    fp = to_onnx(net, tmp_path / "f.onnx", ids)
    q = to_onnx(net, tmp_path / "q.onnx", ids, embeddings="int8")
    tables = _tables(q)
    deq = _check_table(tables, "0.weight", net[0].weight)
    assert not tables["0.weight_int8"][0].any()  # the padding row stays exactly zero
    # the file saves 3 of the table's 4 bytes per value, less one float32 step per row
    saved = os.path.getsize(fp) - os.path.getsize(q)
    assert abs(saved - (3 * vocab * dim - 4 * vocab)) < 0.05 * 3 * vocab * dim

    x = torch.randint(0, vocab, (5, 6))  # another batch size than the example's (dimension 0 is dynamic)
    x[0, 0] = 0
    got = _run(q, x)
    ref = copy.deepcopy(net)
    with torch.no_grad():
        ref[0].weight.copy_(deq)
        want_deq, want = ref(x), net(x)
    assert float((got - want_deq).abs().max()) <= FLOAT_RTOL * float(want_deq.abs().max())
    steps = torch.from_numpy(tables["0.weight_scale"])[x]  # (5, 6, 1): the step of each looked-up row
    bound = (steps / 2) * net[1].weight.detach().abs().sum(1)  # sum_j |W_kj| s_r / 2, per token and output
    err = (got - want).abs()
    assert bool((err <= bound + 1e-6).all()), float((err - bound).max())
    assert float(err.max()) > 0  # the table really was rounded
    assert float(err[0, 0].max()) < 1e-6  # the padding token looked up the exact zero row


def _tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


class _Hidden(nn.Module):
    """``last_hidden_state`` of a BERT for ``input_ids`` (one output for the file and for the Jacobian)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids).last_hidden_state


@pytest.mark.slow
def test_tiny_bert_int8_tables_within_the_propagated_bound(tmp_path: Path) -> None:
    model = _Hidden(_tiny_bert())
    ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(1))
    fp = to_onnx(model, tmp_path / "f.onnx", ids)
    q = to_onnx(model, tmp_path / "q.onnx", ids, embeddings="int8")
    tables = _tables(q)
    emb = model.bert.embeddings
    word = _check_table(tables, "bert.embeddings.word_embeddings.weight", emb.word_embeddings.weight)
    ttype = _check_table(tables, "bert.embeddings.token_type_embeddings.weight", emb.token_type_embeddings.weight)
    saved = os.path.getsize(fp) - os.path.getsize(q)
    tables_saved = sum(3 * t.numel() - 4 * t.shape[0] for t in (word, ttype))  # int8 values + a float step per row
    assert abs(saved - tables_saved) < 0.03 * tables_saved  # the rest: the Cast/Mul nodes added

    x = torch.randint(0, 300, (3, 8), generator=torch.Generator().manual_seed(2))
    got = _run(q, x)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.bert.embeddings.word_embeddings.weight.copy_(word)
        ref.bert.embeddings.token_type_embeddings.weight.copy_(ttype)
        want_deq, want = ref(x), model(x)
    assert float((got - want_deq).abs().max()) <= FLOAT_RTOL * float(want_deq.abs().max())

    # first-order propagation of the per-element bound through the encoder (Jacobian w.r.t. the token embeddings)
    embeds = emb.word_embeddings(x).detach()
    jac = torch.autograd.functional.jacobian(lambda e: model.bert(inputs_embeds=e).last_hidden_state, embeds,
                                             vectorize=True)  # (3, 8, 32, 3, 8, 32)
    step = torch.from_numpy(tables["bert.embeddings.word_embeddings.weight_scale"])[x]  # (3, 8, 1)
    step = step + float(tables["bert.embeddings.token_type_embeddings.weight_scale"][0, 0])  # every token: type 0
    bound = (jac.abs() * (step / 2)).sum((3, 4, 5))
    err = (got - want).abs()
    assert bool((err <= 1.1 * bound + 1e-5).all()), float((err / (bound + 1e-9)).max())
    assert float(err.max()) > 1e-5  # the tables really were rounded


@pytest.mark.slow
def test_qat_bert_gets_int8_tables_beside_its_qdq_layers(tmp_path: Path) -> None:
    model = _Hidden(_tiny_bert())
    ids = torch.randint(0, 300, (4, 8), generator=torch.Generator().manual_seed(1))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder." in n]
    prepare_qat(model, names, QuantConfig(weight_bits=8, activation_bits=8))
    set_qat_flags(model, fake_quant=True, observe=True)
    model.train()
    model(ids)
    model.eval()
    plain = to_onnx(model, tmp_path / "qat.onnx", ids)
    q = to_onnx(model, tmp_path / "qat_emb.onnx", ids, embeddings="int8")
    ops = {n.op_type for n in onnx.load(q).graph.node}
    assert {"DequantizeLinear", "QuantizeLinear", "Cast", "Gather"} <= ops
    word = _check_table(_tables(q), "bert.embeddings.word_embeddings.weight", model.bert.embeddings.word_embeddings.weight)
    assert os.path.getsize(plain) - os.path.getsize(q) > 0.95 * (3 * word.numel() - 4 * word.shape[0])  # + a step per row
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.bert.embeddings.word_embeddings.weight.copy_(word)
        want = ref(ids)
    got = _run(q, ids)
    assert float((got - want).abs().max()) <= ONNX_QUANT_RTOL * float(want.abs().max())


def test_refusals_come_before_any_file(tmp_path: Path) -> None:
    ids = torch.randint(0, 10, (2, 3))
    net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    with pytest.raises(ValueError, match=r"`embeddings` must be one of \['float', 'int8'\], got 'int4'"):
        to_onnx(net, tmp_path / "a.onnx", ids, embeddings="int4")  # type: ignore[arg-type]
    net[1].weight = net[0].weight  # tied, as LM heads are
    with pytest.raises(ValueError, match=r"embedding '0' shares its weight with \['1'\]"):
        to_onnx(net, tmp_path / "a.onnx", ids, embeddings="int8")
    with pytest.raises(ValueError, match="max_norm"):
        to_onnx(nn.Embedding(10, 4, max_norm=1.0), tmp_path / "a.onnx", ids, embeddings="int8")

    class MatchesTable(nn.Module):  # the table read outside the lookup (no module holds it twice)
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.emb(ids) @ self.emb.weight.t()

    with pytest.raises(ValueError, match=r"embedding 'emb'.*also read by"):
        to_onnx(MatchesTable(), tmp_path / "a.onnx", ids, embeddings="int8")
    assert os.listdir(tmp_path) == []
    # the same embedding module reached under two names is one table, rewritten once

    class Twice(nn.Module):
        def __init__(self, emb: nn.Module) -> None:
            super().__init__()
            self.a, self.b = emb, emb

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.a(ids) + self.b(ids)

    twice = Twice(nn.Embedding(10, 4))
    path = to_onnx(twice, tmp_path / "b.onnx", ids, embeddings="int8")
    assert {"a.weight_int8", "b.weight_int8"} & set(_tables(path))
    err = (_run(path, ids) - twice(ids).detach()).abs().max()
    assert 0 < float(err) <= float(twice.a.weight.detach().abs().max()) / 127
