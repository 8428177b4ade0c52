"""Distortion analysis: bounds against bit depth, rate-distortion curves, plots."""

from sphkv.analysis.bounds import logit_bound, predicted_logit_rms, predicted_mse

__all__ = ["logit_bound", "predicted_logit_rms", "predicted_mse"]
