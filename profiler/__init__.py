"""Step telemetry schema and the interference profiler."""
