"""scalekv: next-scale image generators (VAR, Infinity) with scale-aware KV cache compression."""

from .cache import CacheLayout, KVCache, Scale, make_cache
from .checkpoint import CheckpointError
from .generation import Generation, ScaleRecord
from .hub import load_pipeline
from .pipeline import VARPipeline

__version__ = "0.1.0"
__all__ = [
    "CacheLayout",
    "CheckpointError",
    "Generation",
    "KVCache",
    "Scale",
    "ScaleRecord",
    "VARPipeline",
    "load_pipeline",
    "make_cache",
]
