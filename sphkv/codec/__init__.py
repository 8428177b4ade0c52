"""Key and value codecs: spherical (ADA) and baselines."""
