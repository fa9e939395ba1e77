"""KV caches: the storage and interface the models use, and the compression policies (one file each)."""

from .base import CacheLayout, KVCache, LayerKV, Scale, make_scales

__all__ = ["CacheLayout", "KVCache", "LayerKV", "Scale", "make_scales"]

from .registry import POLICIES, make_cache, register  # noqa: E402

__all__ += ["POLICIES", "make_cache", "register"]
