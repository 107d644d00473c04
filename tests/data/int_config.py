"""A config file whose get_config returns no config (tests/test_faults.py)."""


def get_config(variant=None):
    return 3
