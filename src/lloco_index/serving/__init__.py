"""Serving at scale: batched HF generation, a batching queue, and the optional vLLM backend.

Nothing here is imported by the default CPU path; vLLM is imported only when
:class:`~lloco_index.serving.vllm_backend.VLLMReader` is built (extra ``serve``).
"""

from .batching import BatchingQueue, generate_batch, generate_prepared_batch, left_pad

__all__ = ["BatchingQueue", "generate_batch", "generate_prepared_batch", "left_pad"]
