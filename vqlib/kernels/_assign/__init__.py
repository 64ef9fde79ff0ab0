"""Nearest-centroid assignment: (n, d) points, (k, d) centroids -> (codes, squared distances)."""

from vqlib.kernels._assign.dispatch import BACKENDS as BACKENDS
from vqlib.kernels._assign.dispatch import assign as assign
from vqlib.kernels._assign.dispatch import check_impl as check_impl
from vqlib.kernels._assign.reference import assign_reference as assign_reference
from vqlib.kernels._assign.xla import BlockSizes as BlockSizes
from vqlib.kernels._dispatch import Impl as Impl
