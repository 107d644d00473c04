"""Experiment configs: one file per dataset, each with get_config(arg) -> ml_collections.ConfigDict."""
