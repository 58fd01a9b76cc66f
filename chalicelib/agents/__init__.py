"""Agents: the registry, selection for a stage, and dispatch (the built-in mock for now)."""
