"""Measuring engines and stacks: the step sweep, the interference search, trace replay."""
