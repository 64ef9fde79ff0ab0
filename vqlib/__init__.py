"""vqlib: vector quantization and clustering in JAX."""

from vqlib import _compile_cache
from vqlib import codebooks as codebooks
from vqlib import kernels as kernels
from vqlib import nn as nn
from vqlib import retrieval as retrieval
from vqlib import testing as testing
from vqlib._compile_cache import enable_compilation_cache as enable_compilation_cache
from vqlib._io import load as load
from vqlib._io import save as save
from vqlib._types import Metric as Metric
from vqlib._version import __version__ as __version__
from vqlib.codebooks import DimWeighted as DimWeighted
from vqlib.codebooks import Quantizer as Quantizer
from vqlib.codebooks import ResidualChain as ResidualChain
from vqlib.codebooks import adc_tables as adc_tables
from vqlib.codebooks import code_layout as code_layout
from vqlib.codebooks import decode as decode
from vqlib.codebooks import dim_weighted as dim_weighted
from vqlib.codebooks import encode as encode
from vqlib.codebooks import fit as fit
from vqlib.codebooks import inner_product as inner_product
from vqlib.codebooks import methods as methods
from vqlib.codebooks import quantizer as quantizer
from vqlib.codebooks import register as register
from vqlib.codebooks import residual as residual
from vqlib.kernels import assign as assign

# JAX's persistent compilation cache, unless the user configured one or set VQLIB_COMPILATION_CACHE=off
# (see vqlib/_compile_cache.py): a second process does not compile vqlib's pipelines again.
_compile_cache.enable_by_default()
