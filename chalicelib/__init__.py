"""MAOF: the Multi-Agent Orchestration Framework, as a Chalice application."""

__version__ = "0.1.0"
