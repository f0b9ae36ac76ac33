"""Exosphere-compatible state manager."""

__version__ = "0.1.0"
