"""Integrations of sphkv with model libraries; ``sphkv.integrations.hf`` for Hugging Face."""
