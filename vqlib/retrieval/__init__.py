"""ANN indexes built from vqlib codebooks (arrives with its issue)."""
