"""Prefect flows of the hmine pipeline: thin wrappers that call hmine's stage functions."""

from hmine.runtime import ensure_prefect_home

ensure_prefect_home()  # before prefect is imported: it cannot create a home whose parent is missing
