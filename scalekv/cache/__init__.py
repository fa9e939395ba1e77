"""KV caches: the storage and interface the models use, and the compression policies (one file each)."""

# importing a policy's module registers it
from .ams_kv import AMSKV
from .base import CacheLayout, KVCache, LayerKV, Scale, check_budget, make_scales
from .h2o import H2O
from .hack import HACK
from .head_stats import HeadStats, load_head_stats
from .head_store import HeadStore
from .heatkv import HeatKV
from .plan import Plan, load_plan, pyramid_plan, rule_plan, uniform_plan
from .pyramidkv import PyramidKV
from .random import RandomKeep
from .registry import POLICIES, make_cache, register
from .scalekv import ScaleKV
from .sliding_window import SlidingWindow
from .snapkv import SnapKV
from .store import KVStore
from .streaming_llm import StreamingLLM

__all__ = [
    "CacheLayout",
    "KVCache",
    "LayerKV",
    "KVStore",
    "HeadStore",
    "HeadStats",
    "load_head_stats",
    "Scale",
    "check_budget",
    "make_scales",
    "Plan",
    "load_plan",
    "pyramid_plan",
    "rule_plan",
    "uniform_plan",
    "POLICIES",
    "make_cache",
    "register",
    "SlidingWindow",
    "StreamingLLM",
    "SnapKV",
    "PyramidKV",
    "H2O",
    "RandomKeep",
    "ScaleKV",
    "HACK",
    "AMSKV",
    "HeatKV",
]
