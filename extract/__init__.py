"""PyTorch extractor: frozen (video-)language-model hidden states -> dff_jax feature shards.

`python -m extract --help` for the command line; `extract/README.md` for the full documentation.
This package imports `dff_jax.records` (the file-format contract) and never JAX. Importing the package
itself is cheap: torch and transformers are imported only by the modules that need them.
"""

__version__ = "0.1.0"


class ExtractError(Exception):
    """A user-facing problem (bad input file, bad option, unusable model folder).

    The command line prints the message and exits with status 2, without a traceback, so the
    message must name the file (and line or item) and say what was expected.
    """
