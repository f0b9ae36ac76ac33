"""Exosphere-compatible state manager."""
