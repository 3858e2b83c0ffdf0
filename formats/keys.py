"""Every metadata key nnconv writes into a file, in one place.

Formats store these beside the user's own metadata (safetensors ``__metadata__``,
ONNX ``metadata_props``, HDF5 attributes...).  The ``nnconv.`` prefix keeps them
apart from anything else a file carries; readers that do not know a key keep it as
plain metadata.
"""

from __future__ import annotations

# The checkpoint model (formats/checkpoint.py): how a flat file becomes the object again.
STRUCTURE_KEY = "nnconv.structure"  # the container tree (dicts, lists, leaves) as JSON
ALIASES_KEY = "nnconv.aliases"  # tied names -> the stored tensor
VERSION_KEY = "nnconv.version"  # the record format's version
CAST_KEY = "nnconv.cast"  # the dtype a conversion cast floats to (--dtype)
PATHS_KEY = "nnconv.paths"  # HDF5: dataset path per tensor name where names need escaping

# The engine (converter/): what makes weights runnable and checkable again.
ARCHITECTURE_KEY = "nnconv.architecture"  # the module tree record (--model, rebuilt later)
HF_KEY = "nnconv.hf"  # a transformers model: {"architecture", "config", "inputs"}
EXPORTER_KEY = "nnconv.onnx.exporter"  # which exporter wrote an ONNX file
OPTIMIZED_KEY = "nnconv.onnx.optimized"  # "1" when the exporter folded constants
MAPPING_KEY = "nnconv.onnx_mapping"  # ONNX import: state_dict key <- initializer
GOLDEN_KEY = "nnconv.golden"  # a golden file's inputs and outputs description
QUANT_KEY = "nnconv.quantization"  # GGUF: {tensor: GGML type} dequantised when read
DEQUANTIZED_KEY = "nnconv.dequantized"  # {tensor: GGML type} a written file's values came from
