"""ADC scan with top-k: (q, m, kc) lookup tables, (n, m) codes -> k nearest rows per query."""

from vqlib.kernels._adc_topk.dispatch import BACKENDS as BACKENDS
from vqlib.kernels._adc_topk.dispatch import adc_topk as adc_topk
from vqlib.kernels._adc_topk.reference import adc_topk_reference as adc_topk_reference
