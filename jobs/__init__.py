"""Offline batch jobs that run on the co-located replicas (submitted with `ray job submit`)."""
