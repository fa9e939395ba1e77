"""Name -> cache policy class. Each policy file registers itself with :func:`register`."""

from __future__ import annotations

from .base import KVCache

POLICIES: dict[str, type[KVCache]] = {"full": KVCache}


def register(cls: type[KVCache]) -> type[KVCache]:
    """Class decorator: make a policy available by its snake_case ``name``."""
    if cls.name in POLICIES and POLICIES[cls.name] is not cls:
        raise ValueError(f"cache policy name {cls.name!r} is registered twice")
    POLICIES[cls.name] = cls
    return cls


def make_cache(name: str, **kwargs) -> KVCache:
    """Build the policy registered as ``name`` (e.g. ``make_cache("scalekv", budget=0.1)``)."""
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}: expected one of {sorted(POLICIES)}")
    if name == "full":
        if kwargs.get("budget", 1.0) not in (None, 1.0):
            raise ValueError(f"the full cache keeps everything; budget={kwargs['budget']!r} makes no sense for it")
        return KVCache()
    return POLICIES[name](**kwargs)
