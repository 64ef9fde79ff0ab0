"""y = x @ W^T with W stored compressed (codes plus scalar / VQ / AQ / E8P codebooks)."""

from vqlib.kernels._lut_matmul._dispatch import BACKENDS as BACKENDS
from vqlib.kernels._lut_matmul._dispatch import lut_matmul as lut_matmul
from vqlib.kernels._lut_matmul._weight import KINDS as KINDS
from vqlib.kernels._lut_matmul._weight import LUTWeight as LUTWeight
from vqlib.kernels._lut_matmul._weight import dequantize as dequantize
from vqlib.kernels._lut_matmul._weight import lut_weight as lut_weight
from vqlib.kernels._lut_matmul.reference import lut_matmul_reference as lut_matmul_reference
