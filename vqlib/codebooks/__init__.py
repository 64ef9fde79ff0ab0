"""Codebook primitives: each an immutable pytree with fit / encode / decode functions."""

from vqlib.codebooks._kmeans import KMeansCodebook as KMeansCodebook
from vqlib.codebooks._kmeans import KMeansStats as KMeansStats
from vqlib.codebooks._kmeans import fit_kmeans as fit_kmeans
from vqlib.codebooks._kmeans import fit_kmeans_batched as fit_kmeans_batched
from vqlib.codebooks._kmeans_stream import fit_kmeans_streaming as fit_kmeans_streaming
