"""vqlib: vector quantization and clustering in JAX."""

from vqlib import codebooks as codebooks
from vqlib import kernels as kernels
from vqlib import nn as nn
from vqlib import retrieval as retrieval
from vqlib import testing as testing
from vqlib._compose import DimWeighted as DimWeighted
from vqlib._compose import ResidualChain as ResidualChain
from vqlib._compose import dim_weighted as dim_weighted
from vqlib._compose import quantizer as quantizer
from vqlib._compose import residual as residual
from vqlib._fit import METHODS as METHODS
from vqlib._fit import adc_tables as adc_tables
from vqlib._fit import assign as assign
from vqlib._fit import code_layout as code_layout
from vqlib._fit import decode as decode
from vqlib._fit import encode as encode
from vqlib._fit import fit as fit
from vqlib._io import load as load
from vqlib._io import save as save
from vqlib.codebooks._turboquant import inner_product as inner_product

__version__ = "0.1.0"
