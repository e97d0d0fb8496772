"""The chat service: the Ray Serve LLM app, the replica server class, the ingress, the registry."""
