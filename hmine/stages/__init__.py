"""Pipeline stages: plain functions that read and write the stores of a run directory."""
