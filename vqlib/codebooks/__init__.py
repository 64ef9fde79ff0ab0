"""Codebook primitives: each an immutable pytree with fit / encode / decode functions."""

from vqlib.codebooks._adc import adc_lookup as adc_lookup
from vqlib.codebooks._additive import AdditiveCodebook as AdditiveCodebook
from vqlib.codebooks._additive import fit_aq as fit_aq
from vqlib.codebooks._additive import fit_rvq as fit_rvq
from vqlib.codebooks._dkm import dkm as dkm
from vqlib.codebooks._kmeans import KMeansCodebook as KMeansCodebook
from vqlib.codebooks._kmeans import KMeansStats as KMeansStats
from vqlib.codebooks._kmeans import fit_kmeans as fit_kmeans
from vqlib.codebooks._kmeans import fit_kmeans_batched as fit_kmeans_batched
from vqlib.codebooks._kmeans_stream import fit_kmeans_streaming as fit_kmeans_streaming
from vqlib.codebooks._packing import pack_codes as pack_codes
from vqlib.codebooks._packing import unpack_codes as unpack_codes
from vqlib.codebooks._product import ProductCodebook as ProductCodebook
from vqlib.codebooks._product import fit_opq as fit_opq
from vqlib.codebooks._product import fit_pq as fit_pq
from vqlib.codebooks._vq_layer import EMACodebook as EMACodebook
from vqlib.codebooks._vq_layer import VQStats as VQStats
from vqlib.codebooks._vq_layer import ema_init as ema_init
from vqlib.codebooks._vq_layer import ema_update as ema_update
from vqlib.codebooks._vq_layer import restart_dead_codes as restart_dead_codes
from vqlib.codebooks._vq_layer import vector_quantize as vector_quantize
