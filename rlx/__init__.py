"""rlx: a config-driven experiment runner for reinforcement learning on language models."""

__version__ = "0.1.0"
