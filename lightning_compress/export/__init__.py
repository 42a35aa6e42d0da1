"""Exporters: physically smaller or integer models, and compressed artefacts written to disk.

- :func:`thin`: remove the units that structured pruning zeroed (a physically smaller model);
- :func:`to_semi_structured`: 2:4-pruned ``Linear`` weights as CUDA semi-structured sparse tensors;
- :func:`slice_width`: one width of a network trained by ``SlimmableTraining``;
- :func:`scale`: a narrower / shallower student of the same architecture (compound scaling);
- :func:`convert_quantized`: the integer model of a quantization-aware-trained one;
- :func:`save_compressed` / :func:`load_compressed`: the Huffman-coded Deep Compression file;
- :func:`to_onnx`: an ONNX file for onnxruntime (QDQ with integer weights for quantized models);
- :func:`save_pretrained` / :func:`load_safetensors`: Hugging Face safetensors in the compressed-tensors layout;
- :func:`export_model`: any of these formats by name (what ``lightning-compress export --format`` calls).

Example:
    >>> from lightning_compress import export
    >>> sorted(export.__all__)[:3]
    ['convert_quantized', 'export_model', 'load_compressed']
"""

from lightning_compress.export.deploy import export_model
from lightning_compress.export.lcdc import load_compressed, save_compressed
from lightning_compress.export.onnx import to_onnx
from lightning_compress.export.pruning import thin, to_semi_structured
from lightning_compress.export.quantization import convert as convert_quantized
from lightning_compress.export.safetensors import load_safetensors, save_pretrained
from lightning_compress.export.scaling import scale
from lightning_compress.export.slimmable import slice_width

__all__ = [
    "convert_quantized",
    "export_model",
    "load_compressed",
    "load_safetensors",
    "save_compressed",
    "save_pretrained",
    "scale",
    "slice_width",
    "thin",
    "to_onnx",
    "to_semi_structured",
]
