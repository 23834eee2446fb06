"""Recommendation models on TorchRec embedding tables, looked up by name (models.registry)."""
