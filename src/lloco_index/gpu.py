"""GPU helpers for the scale path: faiss indexes on GPUs (``gpu`` extra: faiss-gpu-cu12).

>>> index = to_gpu_if_available(faiss.IndexFlatIP(384))   # unchanged where faiss has no GPU support
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def faiss_gpu_count() -> int:
    """GPUs faiss can use: 0 with faiss-cpu (no ``get_num_gpus``) or without a CUDA device."""
    try:
        import faiss
    except ImportError:
        return 0
    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get is not None else 0
    except Exception:  # a faiss-gpu build on a machine whose driver it cannot use
        return 0


def to_gpu_if_available(index):
    """A copy of a CPU faiss index spread over all GPUs, or ``index`` itself when there are none.

    Only for in-memory indexes: write GPU indexes back with
    ``faiss.index_gpu_to_cpu`` before ``faiss.write_index``.
    """
    if faiss_gpu_count() == 0:
        return index
    import faiss

    logger.info("faiss: moving a %s index with %d vectors to %d GPU(s)", type(index).__name__, index.ntotal, faiss_gpu_count())
    return faiss.index_cpu_to_all_gpus(index)
