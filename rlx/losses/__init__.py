"""Losses: policy losses, aggregation of per-token losses, entropy (and later value/preference/SFT)."""
