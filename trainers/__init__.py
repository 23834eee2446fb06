"""Code that runs inside one training rank, identically under Ray Train workers and under torchrun."""
