"""Prefect flows of the hmine pipeline: thin wrappers that call hmine's stage functions."""
