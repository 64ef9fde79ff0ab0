"""Flax nnx layers: DKM weight clustering and palettisation, the VQ-VAE layer and its math."""

from vqlib.nn._common import QuantizerState as QuantizerState
from vqlib.nn._dkm import DKM as DKM
from vqlib.nn._dkm import DKMPalettizer as DKMPalettizer
from vqlib.nn._palettize import PalettizedModel as PalettizedModel
from vqlib.nn._palettize import export_palettized as export_palettized
from vqlib.nn._palettize import load_palettized as load_palettized
from vqlib.nn._palettize import palettize_kmeans as palettize_kmeans
from vqlib.nn._vq import VectorQuantizer as VectorQuantizer
from vqlib.nn._vq_math import EMACodebook as EMACodebook
from vqlib.nn._vq_math import VQStats as VQStats
from vqlib.nn._vq_math import ema_init as ema_init
from vqlib.nn._vq_math import ema_update as ema_update
from vqlib.nn._vq_math import restart_dead_codes as restart_dead_codes
from vqlib.nn._vq_math import vector_quantize as vector_quantize
