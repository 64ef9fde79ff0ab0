"""Kernels on arrays (never codebook objects), each beside a pure-jnp reference, one dispatcher per op.

Each op lives in a private folder (`_assign/`, `_adc_topk/`, `_lut_matmul/`) holding its
dispatcher, its reference and one file per backend. The dispatchers and references are
exported here; a backend's own module (its function with the `block=` tuning knobs and its
`BlockSizes`) is reached with `backend(op, impl)`, imported on first use.
"""

from vqlib.kernels._adc_topk.dispatch import BACKENDS as _ADC_TOPK_BACKENDS
from vqlib.kernels._adc_topk.dispatch import adc_topk as adc_topk
from vqlib.kernels._adc_topk.reference import adc_scores as adc_scores
from vqlib.kernels._adc_topk.reference import adc_topk_reference as adc_topk_reference
from vqlib.kernels._argmin import first_argmin as first_argmin
from vqlib.kernels._assign.dispatch import BACKENDS as _ASSIGN_BACKENDS
from vqlib.kernels._assign.dispatch import assign as assign
from vqlib.kernels._assign.dispatch import check_impl as check_impl
from vqlib.kernels._assign.dispatch import fitting_impl as fitting_impl
from vqlib.kernels._assign.reference import assign_reference as assign_reference
from vqlib.kernels._assign.subspaces import BACKENDS as _ASSIGN_SUBSPACES_BACKENDS
from vqlib.kernels._assign.subspaces import assign_subspaces as assign_subspaces
from vqlib.kernels._dispatch import Impl as Impl
from vqlib.kernels._dispatch import faiss_available as faiss_available
from vqlib.kernels._kv_attend.dispatch import BACKENDS as _KIVI_ATTEND_BACKENDS
from vqlib.kernels._kv_attend.dispatch import kivi_attend as kivi_attend
from vqlib.kernels._kv_attend.dispatch import kivi_attend_native_ready as kivi_attend_native_ready
from vqlib.kernels._kv_attend.reference import kivi_attend_reference as kivi_attend_reference
from vqlib.kernels._lut_matmul.dispatch import BACKENDS as _LUT_MATMUL_BACKENDS
from vqlib.kernels._lut_matmul.dispatch import lut_matmul as lut_matmul
from vqlib.kernels._lut_matmul.reference import lut_matmul_reference as lut_matmul_reference
from vqlib.kernels._lut_matmul.weight import LUT_KINDS as LUT_KINDS
from vqlib.kernels._lut_matmul.weight import LUTWeight as LUTWeight
from vqlib.kernels._lut_matmul.weight import dequantize as dequantize
from vqlib.kernels._lut_matmul.weight import lut_weight as lut_weight
from vqlib.kernels._nearest_level import nearest_level as nearest_level

BACKENDS = {
    "assign": _ASSIGN_BACKENDS,
    "assign_subspaces": _ASSIGN_SUBSPACES_BACKENDS,
    "adc_topk": _ADC_TOPK_BACKENDS,
    "lut_matmul": _LUT_MATMUL_BACKENDS,
    "kivi_attend": _KIVI_ATTEND_BACKENDS,
}


def backend(op: str, impl: str):
    """The module of one backend of an op, e.g. `backend("assign", "pallas_gpu")`: its function
    (same name as the op) takes the backend's tuning knobs as `block=BlockSizes(...)`.

    Example:
        >>> import vqlib
        >>> vqlib.kernels.backend("assign", "xla").BlockSizes().block_n
        4096
    """
    import importlib

    if op not in BACKENDS:
        raise ValueError(f"op must be one of {sorted(BACKENDS)}, got {op!r}")
    if impl not in BACKENDS[op]:
        raise ValueError(f"impl must be one of {sorted(BACKENDS[op])} for {op}, got {impl!r}")
    return importlib.import_module(BACKENDS[op][impl].partition(":")[0])
