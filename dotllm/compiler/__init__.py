"""Constraint compilation: spec -> canonical key -> regex -> outlines-core index -> mask table."""
