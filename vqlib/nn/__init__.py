"""Flax nnx layers: DKM weight clustering and palettisation, VQ-VAE quantization."""

from vqlib.nn._modules import DKM as DKM
from vqlib.nn._modules import DKMPalettizer as DKMPalettizer
from vqlib.nn._modules import PalettizedModel as PalettizedModel
from vqlib.nn._modules import QuantizerState as QuantizerState
from vqlib.nn._modules import VectorQuantizer as VectorQuantizer
from vqlib.nn._modules import export_palettized as export_palettized
from vqlib.nn._modules import load_palettized as load_palettized
from vqlib.nn._modules import palettize_kmeans as palettize_kmeans
