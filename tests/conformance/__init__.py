"""Fixture checkers: one module per model family, each exposing ``MODEL_PREFIX`` and ``cases(dir)``."""
