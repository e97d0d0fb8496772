"""Colocate: online chat and offline batch inference co-located on the same vLLM replicas."""

__version__ = "0.1.0"
