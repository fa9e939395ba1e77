"""Name -> cache policy class. Each policy file registers itself with :func:`register`."""

from __future__ import annotations

import inspect

from .base import KVCache

POLICIES: dict[str, type[KVCache]] = {"full": KVCache}


def register(cls: type[KVCache]) -> type[KVCache]:
    """Class decorator: make a policy available by its snake_case ``name``."""
    if cls.name in POLICIES and POLICIES[cls.name] is not cls:
        raise ValueError(f"cache policy name {cls.name!r} is registered twice")
    POLICIES[cls.name] = cls
    return cls


# taken by every cache (KVCache.configure), whatever its policy
STORAGE_OPTIONS = ("store", "timing", "kv_bits", "kv_group", "kv_keys", "kv_sinks")


def make_cache(name: str, **kwargs) -> KVCache:
    """Build the policy registered as ``name`` (e.g. ``make_cache("scalekv", budget=0.1, plan="plan.json")``).
    The storage options (:data:`STORAGE_OPTIONS`: ``store``, ``timing``, ``kv_bits``, ``kv_group``, ``kv_keys``,
    ``kv_sinks``) go to :meth:`KVCache.configure`; the rest to the policy."""
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}: expected one of {sorted(POLICIES)}")
    cls = POLICIES[name]
    storage = {k: kwargs.pop(k) for k in STORAGE_OPTIONS if k in kwargs}
    params = inspect.signature(cls).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(
            f"cache policy {name!r} takes no argument(s) {unknown}: expected some of "
            f"{sorted(set(params) | set(STORAGE_OPTIONS))}"
        )
    return cls(**kwargs).configure(**storage)
