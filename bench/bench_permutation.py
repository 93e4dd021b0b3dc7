"""Permutation test: mmfusion.strata.stats.permutation_null vs a scipy loop, side by side.

``--permutations`` (10000) size-preserving re-partitions x ``--factors`` (13) factors x
``--n`` (1000) subjects in ``--clusters`` (9) clusters. Ours: ranks once, one batched
one-hot product per chunk of permutations. Naive: ``scipy.stats.kruskal`` per factor and
permutation on ``--naive-permutations`` permutations, scaled to the full count. Checks
the observed H against scipy and prints both times and the ratio.

Usage: ``OMP_NUM_THREADS=2 python bench/bench_permutation.py``
"""
from __future__ import annotations

import os
import time

from _common import cluster_parser, limit_threads  # bench/ is on sys.path


def main():
    p = cluster_parser(__doc__)
    p.add_argument("--factors", type=int, default=13)
    p.add_argument("--permutations", type=int, default=10000)
    p.add_argument("--naive-permutations", type=int, default=100)
    args = p.parse_args()
    limit_threads(args.threads)
    import numpy as np
    from scipy import stats as sps

    from mmfusion.strata import stats

    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.clusters, args.n)
    scores = rng.standard_normal((args.n, args.factors))
    scores[:, 0] += 0.2 * labels
    print(f"n={args.n} factors={args.factors} clusters={args.clusters} permutations={args.permutations} "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")

    t0 = time.perf_counter()
    h_obs, null = stats.permutation_null(scores, labels, args.permutations, seed=0)
    pvals = stats.permutation_pvalues(h_obs, null)
    t_ours = time.perf_counter() - t0
    print(f"ours : {t_ours:7.2f} s  (p of the planted factor {pvals[0]:.2g}, of the others "
          f"{pvals[1:].min():.2g}..{pvals[1:].max():.2g})  target <= 10 s: {'PASS' if t_ours <= 10 else 'FAIL'}")

    t0 = time.perf_counter()
    for _ in range(args.naive_permutations):
        perm = rng.permutation(labels)
        for f in range(args.factors):
            sps.kruskal(*[scores[perm == g, f] for g in range(args.clusters)])
    per = (time.perf_counter() - t0) / args.naive_permutations
    print(f"naive: {per * args.permutations:7.2f} s  (scipy.stats.kruskal loop, {args.naive_permutations} "
          f"permutations timed, scaled)  speed-up {per * args.permutations / t_ours:.0f}x")
    want = [sps.kruskal(*[scores[labels == g, f] for g in range(args.clusters)]).statistic
            for f in range(args.factors)]
    print(f"observed H equals scipy's: max |diff| = {np.max(np.abs(h_obs - want)):.2e}")


if __name__ == "__main__":
    main()
