"""The library's words in the command line's: an error the library raises, re-raised by a
command, names the command's options (``--activation``, ``--dtype float32``) instead of the
library's arguments (``activations=``, ``dtype='float32'``).

    >>> cli_words("pass dtype='float32' or activations=")
    'pass --dtype float32 or --activation'
"""

from __future__ import annotations

from ..io.mlp_interop import BIAS_FREE_HINT

__all__ = ["cli_words"]

# The library's argument names, as the command line spells them (item 26: errors the CLI
# re-raises speak its own language).
_CLI_WORDS = (
    (BIAS_FREE_HINT, "the command line reads networks with a bias in every layer (an MLP); load this one in "
                     "Python with jg.Sequential.load, which keeps it bias-free"),
    ("pass the torch module: jg.load(path, model=module)", "give the torch module that names them: --model package.module:factory"),
    ("leave out activations=", "leave out --activation and --output-activation"),
    ("pass activations= (one per Linear)", "give --activation (the hidden layers) and --output-activation (default identity)"),
    ("add one, or pass activations=", "add one, or give --activation (hidden layers) and --output-activation"),
    ("pass activations=", "give --activation (the hidden layers) and --output-activation (default identity)"),
    ("pass dtype='float32'", "pass --dtype float32"),
    ("activations=", "--activation"),
    ("output_activation=", "--output-activation"),
    ("spectrum_samples=", "--spectrum-samples "),
    ("norm_samples=", "--norm-samples "),
)


def cli_words(msg: str) -> str:
    """``msg`` with the library's argument names (``activations=``, ``dtype=``…) replaced by the
    command line's options."""
    for lib, cli in _CLI_WORDS:
        msg = msg.replace(lib, cli)
    return msg
