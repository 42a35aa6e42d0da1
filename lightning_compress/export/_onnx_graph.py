"""What :func:`~lightning_compress.export.to_onnx` removes from the exported graph before saving: records that
no runtime needs and that make a small model's file larger."""

from __future__ import annotations

from typing import Any

__all__: list[str] = []  # private to to_onnx


def drop_records(graph: Any) -> None:
    """Clear the exporter's debug records on nodes and weights (``metadata_props``: source names, a third of a
    small file) and the inferred type and shape of every value between nodes (the file's ``value_info``, which
    runtimes infer again on load; DigitsMLP W8A8: 3.8 of 61.8 KB). The graph's outputs keep theirs."""
    outputs = {id(v) for v in graph.outputs}
    for value in graph.initializers.values():
        value.metadata_props.clear()
    for node in graph.all_nodes():
        node.metadata_props.clear()
        for value in node.outputs:
            if id(value) not in outputs:
                value.type, value.shape = None, None
