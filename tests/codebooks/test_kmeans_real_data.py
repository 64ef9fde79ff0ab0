"""flash k-means on real embeddings (GloVe 6B 50d from ../shared/data), against faiss-cpu."""

import numpy as np
import pytest

import vqlib


def test_glove_inertia_matches_faiss_from_the_same_seeds(shared_data):
    faiss = pytest.importorskip("faiss")
    path = shared_data / "glove-6b-50d" / "base.npy"
    if not path.exists():
        pytest.skip(f"{path} not found")
    x = np.load(path)  # (100000, 50) float32 word vectors
    k, num_iters = 256, 10
    seeds = np.asarray(vqlib.fit(x, "kmeans", k=k, max_iter=0).centroids)
    ours = vqlib.fit(x, "kmeans", k=k, init=seeds, max_iter=num_iters, tol=0.0)
    fk = faiss.Kmeans(x.shape[1], k, niter=num_iters, max_points_per_centroid=10**9, seed=1)
    fk.train(x, init_centroids=seeds)

    def inertia(c):  # float64 oracle
        x64, c64 = x.astype(np.float64), np.asarray(c, np.float64)
        d2 = (x64**2).sum(1)[:, None] - 2 * x64 @ c64.T + (c64**2).sum(1)[None, :]
        return np.maximum(d2.min(1), 0).sum()

    ours_i, faiss_i = inertia(ours.centroids), inertia(fk.centroids)
    assert abs(ours_i - faiss_i) <= 5e-3 * faiss_i  # measured: within 1e-6 when written
    assert int(ours.stats.num_reseeded) == 0
