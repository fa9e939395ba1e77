"""Offline ASI calibration: which (layer, scale) pairs are drafters, and the plan built from it."""
