"""Datasets and data modules of jointgen."""
