"""Kernels on arrays (never codebook objects), each beside a pure-jnp reference, one dispatcher per op."""

from vqlib.kernels.adc_topk._dispatch import adc_topk as adc_topk
from vqlib.kernels.assign._dispatch import assign as assign
from vqlib.kernels.lut_matmul._dispatch import lut_matmul as lut_matmul
from vqlib.kernels.lut_matmul._weight import LUTWeight as LUTWeight
from vqlib.kernels.lut_matmul._weight import lut_weight as lut_weight
