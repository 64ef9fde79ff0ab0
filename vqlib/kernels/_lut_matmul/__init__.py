"""y = x @ W^T with W stored compressed (codes plus scalar / VQ / AQ / E8P codebooks)."""

from vqlib.kernels._lut_matmul.dispatch import BACKENDS as BACKENDS
from vqlib.kernels._lut_matmul.dispatch import lut_matmul as lut_matmul
from vqlib.kernels._lut_matmul.reference import lut_matmul_reference as lut_matmul_reference
from vqlib.kernels._lut_matmul.weight import LUT_KINDS as LUT_KINDS
from vqlib.kernels._lut_matmul.weight import LUTWeight as LUTWeight
from vqlib.kernels._lut_matmul.weight import dequantize as dequantize
from vqlib.kernels._lut_matmul.weight import lut_weight as lut_weight
