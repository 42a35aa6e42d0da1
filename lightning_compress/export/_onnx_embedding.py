"""Int8 weight-only embedding tables in the ONNX graph (``to_onnx(..., embeddings="int8")``).

Post-training (export-time) quantization, not QAT: each ``nn.Embedding`` table the exported graph reads with a
``Gather`` is rounded to int8 per row (per token), symmetric, step ``s_r = max_j |w_rj| / 127``, codes in
``[-127, 127]``; every element moves by at most ``s_r / 2`` (``max |w_r| / 254``, 0.39 % of the row's largest
magnitude). An all-zero row (a ``padding_idx`` row) gets codes 0 and stays exactly 0.

The graph, rewritten after ``torch.onnx.export`` (the exporter writes ``nn.Embedding`` as ``Gather(table, ids)``)::

    Gather(int8 table, ids) -> Cast(float) -> Mul <- Gather(steps (V, 1), ids)

so onnxruntime gathers int8 rows and dequantizes only the rows it looked up. The alternative,
``DequantizeLinear(table, steps, axis=0) -> Gather``, is not constant-folded by onnxruntime 1.32 (it keeps
DequantizeLinear nodes): it dequantizes the whole table on every run. ``python benchmarks/onnx_embedding.py``
(MiniLM's 30522 x 384 table, ids (32, 32), 1 thread, onnxruntime 1.32, median of 15 alternating rounds in one
process on a shared 2-core machine; ``benchmarks/results/onnx_embedding.json``): the Gather form 0.48 ms per run,
the DequantizeLinear form 7.0 ms, the float table's plain Gather 0.26 ms; resident memory added by the session and
one run (each in a fresh process): +25 MB, +74 MB (the 47 MB float table rebuilt each run), +58 MB.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_compress.functional import quantization as qf
from lightning_compress.targets import tied_elsewhere

#: values of ``to_onnx``'s ``embeddings`` argument
EMBEDDING_MODES = ("float", "int8")


def quantize_table(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 codes ``(V, D)`` and float32 steps ``(V,)`` of an embedding table.

    Example:
        >>> codes, steps = quantize_table(torch.tensor([[0.5, -1.0], [0.0, 0.0]]))
        >>> codes.tolist(), codes.dtype, bool(steps[0] * 127 == 1.0)
        ([[64, -127], [0, 0]], torch.int8, True)
    """
    w = weight.detach().float()
    scale, zero = qf.uniform_qparams(w, 8, symmetric=True, per_channel=True)
    lo, hi = qf.int_range(8, symmetric=True)
    return qf.quantize_uniform(w, scale, zero, lo, hi).to(torch.int8), scale


def embedding_tables(model: nn.Module, mode: str) -> dict[str, str]:
    """``{initializer name: module name}`` of the tables to store as int8 (none for ``"float"``).

    Raises:
        ValueError: ``mode`` not in :data:`EMBEDDING_MODES`; an embedding whose weight another module holds (tied
            to an output layer, as LM heads are: int8 would change that layer as well); one with ``max_norm``
            (renormalizes its rows in the forward).
    """
    if mode not in EMBEDDING_MODES:
        raise ValueError(f"`embeddings` must be one of {list(EMBEDDING_MODES)}, got {mode!r}")
    if mode == "float":
        return {}
    tables, seen = {}, {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, nn.Embedding):
            continue
        if id(module) in seen:  # one module under several names: the exporter may name its table after any
            tables[f"{name}.weight" if name else "weight"] = seen[id(module)]
            continue
        seen[id(module)] = name
        tied = [n for n in tied_elsewhere(model, name) if model.get_submodule(n) is not module]
        if tied:
            raise ValueError(f"`embeddings='int8'`: embedding {name!r} shares its weight with {tied} (tied weights); "
                             "int8 storage would quantize those layers too. Untie them or use embeddings='float'")
        if module.max_norm is not None:
            raise ValueError(f"`embeddings='int8'`: embedding {name!r} has max_norm={module.max_norm} (its rows are "
                             "renormalized in the forward); use embeddings='float'")
        tables[f"{name}.weight" if name else "weight"] = name
    return tables


def _initializer(name: str, array: np.ndarray) -> Any:
    import onnx_ir as ir

    tensor = ir.Tensor(array, name=name)
    return ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)


def _same_table(value: Any, table: np.ndarray) -> bool:
    """Whether initializer ``value`` holds ``table`` or its transpose (the exporter folds ``weight.t()``)."""
    if value.const_value is None or value.shape is None or value.const_value.size != table.size:
        return False
    other = value.const_value.numpy()
    return other.shape in (table.shape, table.shape[::-1]) and (
        np.array_equal(other, table) or np.array_equal(other, table.T))


def quantize_gathers(graph: Any, tables: dict[str, str]) -> int:
    """Rewrite every ``Gather`` of the ``tables`` initializers of an ``onnx_ir`` graph as an int8 gather (see the
    module docstring); returns how many tables were rewritten. Tables the exporter folded into constants (e.g.
    position embeddings at a fixed sequence length) are not gathered and stay as they are.

    Raises:
        ValueError: a table read by another node than ``Gather`` on axis 0, or also present as another initializer
            (itself or transposed: the exporter folded a use of the weight outside the lookup), naming both.
    """
    import onnx_ir as ir
    from onnx_ir.convenience import replace_nodes_and_values

    done = 0
    for init_name, module_name in tables.items():
        value = graph.initializers.get(init_name)
        if value is None:
            continue
        uses = list(value.uses())
        bad = [u.node.op_type for u in uses if u.node.op_type != "Gather" or u.idx != 0
               or u.node.attributes.get_int("axis", 0) != 0]
        array = value.const_value.numpy()
        copies = [k for k, v in graph.initializers.items() if k != init_name and _same_table(v, array)]
        if copies:
            bad.append(f"a copy of it ({copies[0]!r}, folded by the exporter from a use of the weight)")
        if bad:
            raise ValueError(f"`embeddings='int8'`: embedding {module_name!r}'s table is also read by {bad} in the "
                             "exported graph (a weight used outside the lookup, e.g. tied); use embeddings='float'")
        codes, steps = quantize_table(torch.from_numpy(array.astype(np.float32)))
        dtype = value.const_value.dtype
        q = _initializer(f"{init_name}_int8", codes.numpy())
        s = _initializer(f"{init_name}_scale", steps.numpy().astype(array.dtype).reshape(-1, 1))
        graph.register_initializer(q)
        graph.register_initializer(s)
        for u in uses:
            gather, ids = u.node, u.node.inputs[1]
            rows = ir.node("Gather", [q, ids], {"axis": 0})
            cast = ir.node("Cast", rows.outputs, {"to": dtype})
            row_steps = ir.node("Gather", [s, ids], {"axis": 0})
            out = ir.node("Mul", [cast.outputs[0], row_steps.outputs[0]])
            replace_nodes_and_values(graph, gather, [gather], [rows, cast, row_steps, out], gather.outputs, out.outputs)
        graph.initializers.pop(init_name)
        done += 1
    return done
