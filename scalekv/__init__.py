"""scalekv: next-scale image generators (VAR, Infinity) with scale-aware KV cache compression."""

from .cache import CacheLayout, KVCache, Scale
from .checkpoint import CheckpointError
from .pipeline import Generation, ScaleRecord, VARPipeline

__version__ = "0.1.0"
__all__ = ["CacheLayout", "CheckpointError", "Generation", "KVCache", "Scale", "ScaleRecord", "VARPipeline"]
