"""Storage backends for the soft-prompt store (local directory, fsspec URLs) and int8 quantization.

>>> from lloco_index.store import SoftPromptStore
>>> store = SoftPromptStore.open("s3://bucket/my-index", compressor)               # needs the `remote` extra + s3fs
>>> store = SoftPromptStore.open("./storage", compressor, quantization="int8-absmax-row")
"""

from .backends import FsspecBackend, LocalDirectoryBackend, StorageBackend, backend_for, is_url
from .quantization import INT8_ROWWISE, dequantize_rows, quantize_rows

__all__ = [
    "FsspecBackend", "INT8_ROWWISE", "LocalDirectoryBackend", "StorageBackend", "backend_for", "dequantize_rows",
    "is_url", "quantize_rows",
]
