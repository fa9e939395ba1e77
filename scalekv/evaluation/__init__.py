"""Evaluation harness: every cache policy and budget against the full cache, on fidelity, memory and speed.

``run_eval(EvalConfig(...))`` or ``scalekv eval``; see :mod:`scalekv.evaluation.runner` for the protocol and
:mod:`scalekv.evaluation.storage` for the run folder.
"""

from .config import EvalConfig
from .runner import run_eval

__all__ = ["EvalConfig", "run_eval"]
