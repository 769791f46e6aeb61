"""Training loops: online (REINFORCE / RLOO / GRPO family) and, later, offline ones."""
