"""Discrete-event simulation of Colocate replicas, running the production decision code."""
