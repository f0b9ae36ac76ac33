"""Python SDK for Exosphere workers."""
