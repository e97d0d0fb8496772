"""What runs inside a vLLM engine process: the per-step offline budget, enforcement, telemetry."""
