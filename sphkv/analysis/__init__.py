"""Distortion analysis: bounds against bit depth, rate-distortion curves, plots."""
