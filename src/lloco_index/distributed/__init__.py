"""Data-parallel jobs on Ray (extra ``distributed``); Ray is imported only when a job runs.

>>> from lloco_index.distributed import CompressorSpec, compress_with_ray
"""

from .ray_compress import CompressorDescription, CompressorSpec, RayCompressionResult, compress_with_ray

__all__ = ["CompressorDescription", "CompressorSpec", "RayCompressionResult", "compress_with_ray"]
