"""AP grid search: mmfusion.strata.ap_grid vs the naive scikit-learn loop, side by side.

Embeddings: ``--n`` subjects x ``--d`` dimensions drawn around ``--clusters`` random
centres (float64). Ours: :func:`mmfusion.strata.ap_grid.grid_search` on the whole
``--damping-n`` x ``--preference-n`` grid (the paper's 10 x 1000 by default), i.e. S,
noise and distances once, the fused numba AP kernel in parallel over grid points, the
batched silhouette. Naive: for ``--naive-points`` grid points spread over the grid,
``AffinityPropagation(damping, preference, random_state=seed).fit(X)`` + 
``silhouette_score(X, labels)``, exactly what a straightforward script does; its mean
time per grid point is scaled to the whole grid. The labels of both are compared on the
naive sample (converged fits must be identical). Prints times, the ratio and the check.

Usage: ``OMP_NUM_THREADS=2 python bench/bench_ap_grid.py [--n 1000 --d 1536
--damping-n 10 --preference-n 1000 --naive-points 20 --threads 2]``
"""
from __future__ import annotations

import time

from _common import cluster_parser, limit_threads  # bench/ is on sys.path


def _parse():
    p = cluster_parser(__doc__)
    p.add_argument("--d", type=int, default=1536)
    p.add_argument("--damping-n", type=int, default=10)
    p.add_argument("--preference-n", type=int, default=1000)
    p.add_argument("--naive-points", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main():
    args = _parse()
    limit_threads(args.threads)
    import numpy as np
    from sklearn.metrics import silhouette_score

    from mmfusion.strata import ap_grid as st
    from mmfusion.strata import ap_kernel as apk
    from mmfusion.config import default_config

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.d)) * 1.0
    X = centres[rng.integers(0, args.clusters, args.n)] + rng.standard_normal((args.n, args.d)) * 1.2
    cfg = dict(default_config()["stratify"], damping_n=args.damping_n, preference_n=args.preference_n)
    P = args.damping_n * args.preference_n
    print(f"n={args.n} d={args.d} grid={args.damping_n}x{args.preference_n} ({P} fits) "
          f"max_iter={cfg['max_iter']} threads={args.threads} numba={apk.HAVE_NUMBA}")

    # warm-up: compile the numba kernels outside the timing
    st.grid_search(X[:40], dict(cfg, damping_n=1, preference_n=2), seed=args.seed, n_threads=args.threads)

    t0, c0 = time.perf_counter(), time.process_time()
    res = st.grid_search(X, cfg, seed=args.seed, n_threads=args.threads)
    t_ours, c_ours = time.perf_counter() - t0, time.process_time() - c0
    g = res.grid
    print(f"ours : {t_ours:8.1f} s for {P} fits ({1000 * t_ours / P:.1f} ms/fit, "
          f"CPU {c_ours:.1f} s, {g['n_iter'].sum()} AP iterations, {int(g['converged'].sum())} converged, "
          f"{int(g['valid'].sum())} valid); chosen {res.best['n_clusters']} clusters, "
          f"silhouette {res.best['silhouette']:.4f}")

    idx = np.unique(np.linspace(0, P - 1, args.naive_points).round().astype(int))
    t_naive, c_naive, same, compared, iters = 0.0, 0.0, 0, 0, 0
    for k in idx:
        row = g.iloc[k]
        t0, c0 = time.perf_counter(), time.process_time()
        labels, converged, n_it = st.sklearn_reference_labels(
            X, row["damping"], row["preference"], args.seed, cfg["max_iter"], cfg["convergence_iter"])
        k_found = len(np.unique(labels))
        if converged and 1 < k_found < args.n:
            silhouette_score(X, labels)
        t_naive += time.perf_counter() - t0
        c_naive += time.process_time() - c0
        iters += n_it
        if converged and row["converged"]:
            ours_labels = apk.ap_fits(*apk.noised_similarity(st.similarity_matrix(X), args.seed),
                                     [row["damping"]], [row["preference"]], cfg["max_iter"],
                                     cfg["convergence_iter"], 1)[0][0]
            compared += 1
            same += int(np.array_equal(ours_labels, labels))
        elif converged != bool(row["converged"]):
            print(f"  convergence differs at damping {row['damping']:.3f} preference {row['preference']:.5g}")
    per_fit = t_naive / len(idx)
    ours_iters = g["n_iter"].iloc[idx].sum()
    print(f"naive: {per_fit * 1000:8.1f} ms/fit over {len(idx)} sampled grid points "
          f"({iters} AP iterations; ours on the same points: {ours_iters}) -> {per_fit * P:8.1f} s "
          f"scaled to {P} fits")
    print(f"speed-up (naive scaled / ours): wall {per_fit * P / t_ours:.1f}x, "
          f"CPU time {c_naive / len(idx) * P / c_ours:.1f}x (the CPU ratio is robust to other load)")
    print(f"labels identical on converged fits: {same}/{compared}")


if __name__ == "__main__":
    main()
