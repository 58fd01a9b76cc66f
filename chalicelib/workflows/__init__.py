"""Workflow definitions, runs and their results."""
