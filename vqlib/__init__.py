"""vqlib: vector quantization and clustering in JAX."""

from vqlib import codebooks as codebooks
from vqlib import kernels as kernels
from vqlib import testing as testing
from vqlib._fit import METHODS as METHODS
from vqlib._fit import assign as assign
from vqlib._fit import decode as decode
from vqlib._fit import encode as encode
from vqlib._fit import fit as fit
from vqlib._io import load as load
from vqlib._io import save as save

__version__ = "0.1.0"
