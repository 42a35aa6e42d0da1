"""What :func:`~lightning_compress.export.to_onnx` removes from the exported graph before saving: records that
no runtime needs and that make a small model's file larger."""

from __future__ import annotations

from typing import Any

__all__: list[str] = []  # private to to_onnx


def drop_records(graph: Any) -> None:
    """Clear the exporter's debug records on nodes and weights (``metadata_props``: source names, a third of a
    small file), on the graph (``torch.export``'s program signature: 37 KB for MiniLM, listing every buffer of the
    exported module, used or not) and the inferred type and shape of every value between nodes (the file's
    ``value_info``, which runtimes infer again on load; DigitsMLP W8A8: 3.8 of 61.8 KB). The graph's outputs keep
    theirs."""
    graph.metadata_props.clear()
    outputs = {id(v) for v in graph.outputs}
    for value in graph.initializers.values():
        value.metadata_props.clear()
    for node in graph.all_nodes():
        node.metadata_props.clear()
        for value in node.outputs:
            if id(value) not in outputs:
                value.type, value.shape = None, None


def _requantized(value: Any) -> bool:
    """Whether ``value`` only feeds a QuantizeLinear, directly or through one Relu (which the Q makes redundant)."""
    for _ in range(2):
        uses = list(value.uses())
        if value.is_graph_output() or len(uses) != 1:
            return False
        node = uses[0].node
        if node.op_type == "QuantizeLinear":
            return True
        if node.op_type != "Relu":
            return False
        value = node.outputs[0]
    return False


def float_bias_where_requantized(graph: Any) -> None:
    """Join the int32 + remainder bias of :class:`~lightning_compress.export.onnx._QDQLayer` back into one float
    bias where the layer's output is quantized again: onnxruntime 1.32 fuses such a layer into ``QGemm`` with a
    float bias as well (the hidden layers of the deploy benchmark's MLPs, checked in the optimized graph), so there
    the split would only add 8 bytes per output channel to the file (DigitsMLP W8A8: 0.310x of fp32 instead of
    0.291x). Layers whose output stays float (a model's last layer) keep the split: there a float bias leaves the
    layer unfused. Only the joined layers' own initializers are removed."""
    import numpy as np
    import onnx_ir as ir

    freed = []
    for node in list(graph.all_nodes()):
        rest = node.inputs[1] if node.op_type == "Add" and len(node.inputs) == 2 else None
        if rest is None or not rest.is_initializer() or not rest.name.endswith(".bias_rest"):
            continue
        first = node.inputs[0].producer()
        dq = first.inputs[1].producer() if first is not None and first.op_type == "Add" else None
        if dq is None or dq.op_type != "DequantizeLinear" or not _requantized(node.outputs[0]):
            continue
        codes, step = (v.const_value.numpy() for v in dq.inputs[:2])
        bias = (codes.astype(np.float32) * step.astype(np.float32) + rest.const_value.numpy()).astype(np.float32)
        name = rest.name.removesuffix("_rest")  # the layer's bias buffer: unused by the split forward, not in the graph
        name = name + "_float" if name in graph.initializers else name
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=rest.shape,
                         const_value=ir.tensor(bias, name=name))
        graph.register_initializer(value)
        first.replace_input_with(1, value)
        node.outputs[0].replace_all_uses_with(first.outputs[0])
        freed += [rest.name, *(v.name for v in dq.inputs[:2])]
        graph.remove([node, dq], safe=True)
    for name in freed:
        if name in graph.initializers and not list(graph.initializers[name].uses()):
            graph.initializers.pop(name)
