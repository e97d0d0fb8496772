"""The only modules that touch vLLM's and Ray's internals, version-checked at import."""
