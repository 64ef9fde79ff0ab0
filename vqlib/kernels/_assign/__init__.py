"""Nearest-centroid assignment: (n, d) points, (k, d) centroids -> (codes, squared distances)."""

from vqlib.kernels._dispatch import Impl as Impl
from vqlib.kernels._assign._dispatch import BACKENDS as BACKENDS
from vqlib.kernels._assign._dispatch import assign as assign
from vqlib.kernels._assign._dispatch import check_impl as check_impl
from vqlib.kernels._assign.reference import assign_reference as assign_reference
from vqlib.kernels._assign.xla import BlockSizes as BlockSizes
