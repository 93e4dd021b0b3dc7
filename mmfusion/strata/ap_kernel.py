"""The affinity-propagation (AP) kernel: message passing, batched fits, final labels.

Every fit reproduces :class:`sklearn.cluster.AffinityPropagation` bit for bit: the same
tiny noise added to S from ``random_state=seed`` (:func:`noised_similarity`,
:func:`noised_diagonal`), the same update order, the same convergence rule and the same
final exemplar refinement (:func:`final_labels`). :func:`ap_fits` runs many
(damping, preference) fits on one noised S: with numba, a fused compiled update that passes
over the n x n messages (A and R rows interleaved) once per iteration instead of ~15 times
(:func:`_ap_run_py`), on ``n_threads`` cores in parallel over grid points
(:func:`_ap_batch_numba_py`); without numba, scikit-learn's loop in numpy
(:func:`sklearn_iteration`), same labels, slower. The grid search around it is
:mod:`mmfusion.strata.ap_grid`.
"""
from __future__ import annotations

import numpy as np

try:  # numba is optional: the numpy fallback gives identical labels, slower
    import numba
    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None
    HAVE_NUMBA = False


def noised_similarity(S: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's degeneracy noise, shared by all fits with ``random_state=seed``.

    scikit-learn does ``S[diag] = preference; S += (eps*S + tiny*100) * Z`` with
    ``Z = RandomState(seed).standard_normal((n, n))``. Off the diagonal this does not
    depend on the preference. Returns the noised S (n, n) with a zero diagonal and the
    diagonal of Z (n,), from which :func:`noised_diagonal` builds each fit's diagonal.
    """
    n = S.shape[0]
    Z = np.random.RandomState(seed).standard_normal(size=(n, n))
    S0 = S.copy()
    np.fill_diagonal(S0, 0.0)
    fi = np.finfo(S0.dtype)
    Sn = S0 + (fi.eps * S0 + fi.tiny * 100) * Z
    return Sn, np.diag(Z).copy()


def noised_diagonal(preference: float, z_diag: np.ndarray) -> np.ndarray:
    """The diagonal (n,) scikit-learn's AP uses for ``preference`` (same float ops)."""
    fi = np.finfo(np.float64)
    p = np.full(z_diag.shape, preference, dtype=np.float64)
    return p + (fi.eps * p + fi.tiny * 100) * z_diag


def sklearn_iteration(A, R, S, tmp, damping: float) -> None:
    """One iteration of scikit-learn's AP loop, verbatim (same numpy ops, same order).

    A, R (n, n) float64: availabilities and responsibilities, updated in place; S (n, n)
    with the preferences on its diagonal; tmp (n, n) scratch. The reference the numba
    kernel is tested against bit for bit.
    """
    n = S.shape[0]
    ind = np.arange(n)
    np.add(A, S, tmp)
    I = np.argmax(tmp, axis=1)
    Y = tmp[ind, I]
    tmp[ind, I] = -np.inf
    Y2 = np.max(tmp, axis=1)
    np.subtract(S, Y[:, None], tmp)
    tmp[ind, I] = S[ind, I] - Y2
    tmp *= 1 - damping
    R *= damping
    R += tmp
    np.maximum(R, 0, out=tmp)
    tmp.flat[:: n + 1] = R.flat[:: n + 1]
    tmp -= np.sum(tmp, axis=0)
    dA = np.diag(tmp).copy()
    tmp.clip(0, np.inf, tmp)
    tmp.flat[:: n + 1] = dA
    tmp *= 1 - damping
    A *= damping
    A -= tmp


def _ap_iterate_numpy(Sn, sdiag, damping, max_iter, convergence_iter):
    """One AP fit, scikit-learn's loop verbatim. Returns (E (n,) bool, n_iter, converged)."""
    n = Sn.shape[0]
    S = Sn.copy()
    S.flat[:: n + 1] = sdiag
    A = np.zeros((n, n))
    R = np.zeros((n, n))
    tmp = np.zeros((n, n))
    e = np.zeros((n, convergence_iter))
    for it in range(max_iter):
        sklearn_iteration(A, R, S, tmp, damping)
        E = (np.diag(A) + np.diag(R)) > 0
        e[:, it % convergence_iter] = E
        K = np.sum(E, axis=0)
        if it >= convergence_iter:
            se = np.sum(e, axis=1)
            if np.sum((se == convergence_iter) + (se == 0)) == n and K > 0:
                return E, it + 1, True
    return E, max_iter, False


def _a_row_py(Ai, Ri, Si, cs_old, c, damping, one_m, lo):
    """Availability update of one row, in place; returns max(A_new + S) over the row
    except at index c (the row's previous argmax, looked at apart).

    Ai, Ri, Si, cs_old (n,) float64: row i of A, R, S and the column sums of the previous
    iteration. The caller sets Ai[i] = -inf first (the diagonal is updated apart), so
    that entry stays -inf and takes no part in the max. ``_fmax`` compiles to a
    vectorized max reduction; a max is exact in any order.
    """
    m = lo
    for j in range(Ai.shape[0]):
        r = Ri[j]
        t = (r if r > 0.0 else 0.0) - cs_old[j]
        t = t if t > 0.0 else 0.0
        a = Ai[j] * damping - t * one_m
        Ai[j] = a
        v = a + Si[j]
        m = _fmax(m, v if j != c else lo)
    return m


def _top_row_py(Ai, Si, best, lo):
    """For A + S (n,) with row max ``best`` (diagonal -inf in Ai): (max below best, first
    index equal to best (n if none), how many equal best). Reductions only: vectorizes."""
    n = Ai.shape[0]
    below = lo
    first = n
    count = 0
    for j in range(n):
        v = Ai[j] + Si[j]
        top = v >= best
        below = _fmax(below, v if v < best else lo)
        first = min(first, j if top else n)
        count += top
    return below, first, count


def _r_row_py(Ri, Si, cs_new, best, damping, one_m):
    """R = R*d + (S - best)*(1-d) over the row, in place, and cs_new += max(R, 0)."""
    for j in range(Ri.shape[0]):
        r = Ri[j] * damping + (Si[j] - best) * one_m
        Ri[j] = r
        cs_new[j] += r if r > 0.0 else 0.0


def _ap_run_py(Sn, sdiag, damping, max_iter, convergence_iter, E_out, AR):
    """One AP fit in the caller's message buffer AR (n, 2, n), overwritten. A fit that runs
    all ``max_iter`` iterations leaves A in AR[:, 0] and R in AR[:, 1], bit-identical to
    scikit-learn's after ``max_iter`` iterations (after convergence R is one update ahead).

    Same float operations in the same order, but ONE sweep over the (n, n) messages per
    iteration instead of ~15: sweep k applies, row by row, iteration k-1's availability
    update and then iteration k's responsibility update (two vectorized loops over the
    row, :func:`_a_row_py` and :func:`_r_row_py`), accumulating iteration k's column
    sums (double-buffered) on the way; the column sums come out in row order, exactly
    like numpy's ``sum(axis=0)``. The row's first argmax of A + S and its second max
    come for free when the row's previous argmax ``c`` is still the unique argmax: the
    A loop returns the max over the row but c, and comparing it with A + S at c decides;
    otherwise (ties, a new argmax: a few percent of the rows once the first iterations
    are done) one more vectorized pass over the row, :func:`_top_row_py`, finds them,
    exactly as ``np.argmax`` and ``np.max`` after masking would. Row i of A
    and of R lie next to each other (one (n, 2, n) array: one memory stream per row,
    and A[i] and R[i] never share cache sets). The diagonal and the argmax entries are
    patched after the row loops, so S (n, n) is shared read-only by all threads.
    Writes the final exemplar mask into E_out (n,) and returns (n_iter, converged).
    """
    n = Sn.shape[0]
    cs_old = np.zeros(n)      # column sums of max(R, 0) (diagonal: R) of iteration k-1
    cs_new = np.zeros(n)      # ... of iteration k, accumulated during this sweep
    e = np.zeros((n, convergence_iter), dtype=np.uint8)  # exemplar flags, last iterations
    se = np.zeros(n, dtype=np.int64)                     # their row sums
    hint = np.arange(n)       # each row's first argmax of A + S in the previous iteration
    lo = -np.inf
    one_m = 1.0 - damping
    for k in range(max_iter + 1):
        cs_new[:] = 0.0
        n_e = 0
        stable = 0
        for i in range(n):
            if k == 0:
                AR[i] = 0.0   # zeroed row by row, just before its first use
            Ai = AR[i, 0]     # AR[i, 0] = A[i], AR[i, 1] = R[i]
            Ri = AR[i, 1]
            Si = Sn[i]
            a_ii = Ai[i]
            r_ii = Ri[i]
            # A = A*d - clip(max(R, 0) - colsum, 0)*(1-d); diagonal R - colsum, unclipped.
            # At k = 0 (A = R = colsum = 0) this leaves A = 0, as it must.
            Ai[i] = lo
            c = hint[i]
            others = _a_row(Ai, Ri, Si, cs_old, c, damping, one_m, lo)  # max of A + S but at c
            a_ii = a_ii * damping - (r_ii - cs_old[i]) * one_m
            if k >= 1:
                ei = (a_ii + r_ii) > 0.0
                E_out[i] = ei
                slot = (k - 1) % convergence_iter
                se[i] += (1 if ei else 0) - e[i, slot]
                e[i, slot] = 1 if ei else 0
                n_e += 1 if ei else 0
                stable += 1 if (se[i] == convergence_iter or se[i] == 0) else 0
            if k < max_iter:
                # best, first argmax and second (max after masking the argmax) of A + S
                v_ii = a_ii + sdiag[i]
                v_c = v_ii if c == i else Ai[c] + Si[c]
                if c != i:
                    others = _fmax(others, v_ii)
                best = _fmax(v_c, others)
                if v_c > others:                   # c is still the unique argmax
                    arg = c
                    second = others
                else:
                    second, arg, count = _top_row(Ai, Si, best, lo)
                    if v_ii == best:
                        arg = i if i < arg else arg
                        count += 1
                    else:
                        second = _fmax(second, v_ii)
                    if count >= 2:
                        second = best              # a tie: np.max after masking one copy
                    hint[i] = arg
                # R = R*d + (S - best)*(1-d); at the argmax S - second
                cs_ii = cs_new[i]
                cs_arg = cs_new[arg]
                r_arg = Ri[arg]
                _r_row(Ri, Si, cs_new, best, damping, one_m)
                if arg != i:
                    r = r_arg * damping + (Si[arg] - second) * one_m
                    Ri[arg] = r
                    cs_new[arg] = cs_arg + (r if r > 0.0 else 0.0)
                r = r_ii * damping + (sdiag[i] - (second if arg == i else best)) * one_m
                Ri[i] = r
                cs_new[i] = cs_ii + r             # diagonal: R itself, unclipped
            Ai[i] = a_ii
        if k >= 1 and k - 1 >= convergence_iter and stable == n and n_e > 0:
            return k, True
        cs_old, cs_new = cs_new, cs_old
    return max_iter, False


_HUGE = 1 << 18  # 2 MiB in float64 values


def _message_buffer_py(n):
    """An (n, 2, n) float64 message buffer (contents undefined) that starts on a 2 MiB
    boundary and is advised onto transparent huge pages (Linux): 3-5 % faster at
    n = 1000 on 2 threads (fewer TLB misses; prefetchers need not stop every 4 KiB)."""
    size = 2 * n * n
    raw = np.empty(size + _HUGE)
    off = ((_HUGE * 8 - raw.ctypes.data % (_HUGE * 8)) % (_HUGE * 8)) // 8
    buf = raw[off:off + size]
    _madvise(buf.ctypes.data, size * 8, 14)  # 14: MADV_HUGEPAGE; a refusal is harmless
    return buf.reshape((n, 2, n))


def _ap_batch_numba_py(Sn, sdiags, dampings, max_iter, convergence_iter, E_out, n_iter, converged):
    """Independent fits in parallel over grid points (one fit per thread, no barriers).

    Workers take the next fit from a shared atomic counter (fits differ in length) and
    reuse one message buffer for all their fits (no fresh pages per fit). There are as
    many workers as fits; those beyond the thread count find the counter exhausted.
    """
    n, P = Sn.shape[0], sdiags.shape[0]
    next_fit = np.zeros(1, dtype=np.int64)
    for _ in numba.prange(P):
        AR = np.empty((0, 2, n))
        p = _fetch_add(next_fit)
        while p < P:
            if AR.shape[0] == 0:
                AR = _message_buffer(n)
            it, conv = _ap_run(Sn, sdiags[p], dampings[p], max_iter, convergence_iter, E_out[p], AR)
            n_iter[p] = it
            converged[p] = conv
            p = _fetch_add(next_fit)


if HAVE_NUMBA:
    import sys as _sys

    from llvmlite import ir as _llir
    from numba.core import cgutils as _cgutils
    from numba.extending import intrinsic as _intrinsic

    from mmfusion.numba_jit import njit_cached

    @_intrinsic
    def _fmax(typingctx, a, b):
        """max(a, b) of two float64 as ``llvm.maxnum`` (no NaNs here), which LLVM vectorizes
        as a reduction; numba's ``a if a > b else b`` stays scalar."""
        def codegen(context, builder, signature, args):
            fnty = _llir.FunctionType(_llir.DoubleType(), [_llir.DoubleType()] * 2)
            fn = _cgutils.get_or_insert_function(builder.module, fnty, "llvm.maxnum.f64")
            return builder.call(fn, args)

        return numba.types.float64(numba.types.float64, numba.types.float64), codegen

    @_intrinsic
    def _fetch_add(typingctx, counter):
        """Atomically ``counter[0] += 1``; returns the old value (counter: (1,) int64)."""
        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            one = context.get_constant(numba.types.int64, 1)
            return builder.atomic_rmw("add", ary.data, one, "seq_cst")

        return numba.types.int64(counter), codegen

    if _sys.platform.startswith("linux"):
        _madvise = numba.types.ExternalFunction(
            "madvise", numba.types.int32(numba.types.voidptr, numba.types.uintp, numba.types.int32))
    else:  # pragma: no cover - no madvise: plain pages
        @njit_cached()
        def _madvise(addr, size, advice):
            return 0

    _FM = {"nnan", "nsz"}  # no NaNs in S; no reassociation, no contraction: exact IEEE ops
    _a_row = njit_cached(nogil=True, fastmath=_FM)(_a_row_py)
    _top_row = njit_cached(nogil=True, fastmath=_FM)(_top_row_py)
    _r_row = njit_cached(nogil=True, fastmath=_FM)(_r_row_py)
    _ap_run = njit_cached(nogil=True, fastmath=_FM)(_ap_run_py)
    _message_buffer = njit_cached()(_message_buffer_py)
    _ap_batch_numba = njit_cached(parallel=True)(_ap_batch_numba_py)


def final_labels(Sn: np.ndarray, sdiag: np.ndarray, E: np.ndarray) -> np.ndarray:
    """scikit-learn's exemplar refinement and labelling from the exemplar mask E (n,).

    Same operations as scikit-learn on S = Sn with ``sdiag`` on its diagonal, without
    building S: only the needed columns/blocks are gathered and their diagonal entries
    patched. Returns labels (n,) int in 0..K-1, or all -1 when there is no exemplar.
    """
    labels, _ = final_labels_and_exemplars(Sn, sdiag, E)
    return labels


def final_labels_and_exemplars(Sn: np.ndarray, sdiag: np.ndarray, E: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`final_labels` and the refined exemplars: (labels (n,) int in 0..K-1, exemplar
    row index (K,) of each label, ascending); (all -1, empty) when there is no exemplar."""
    I = np.flatnonzero(E)
    K = I.size
    if K == 0:
        return np.full(Sn.shape[0], -1), np.zeros(0, dtype=np.int64)
    c = np.argmax(_columns(Sn, sdiag, I), axis=1)
    c[I] = np.arange(K)
    for k in range(K):
        ii = np.asarray(c == k).nonzero()[0]
        block = Sn[ii[:, np.newaxis], ii]
        block[np.arange(ii.size), np.arange(ii.size)] = sdiag[ii]
        j = np.argmax(np.sum(block, axis=0))
        I[k] = ii[j]
    c = np.argmax(_columns(Sn, sdiag, I), axis=1)
    c[I] = np.arange(K)
    labels = I[c]
    centers = np.unique(labels)
    return np.searchsorted(centers, labels), centers.astype(np.int64)


def _columns(Sn: np.ndarray, sdiag: np.ndarray, I: np.ndarray) -> np.ndarray:
    """S[:, I] (n, K) with S's diagonal entries (rows I) set from sdiag."""
    cols = Sn[:, I]
    cols[I, np.arange(I.size)] = sdiag[I]
    return cols


def ap_fits(Sn, z_diag, dampings, preferences, max_iter=1000, convergence_iter=15,
            n_threads=2, use_numba=None):
    """Run AP for each (damping[p], preference[p]) pair, in parallel over pairs.

    Sn (n, n): noised similarity from :func:`noised_similarity`. Returns labels (P, n)
    int (-1 rows where not converged), n_iter (P,) int, converged (P,) bool.
    """
    dampings = np.asarray(dampings, dtype=np.float64)
    preferences = np.asarray(preferences, dtype=np.float64)
    P, n = dampings.size, Sn.shape[0]
    sdiags = np.stack([noised_diagonal(p, z_diag) for p in preferences]) if P else np.zeros((0, n))
    E = np.zeros((P, n), dtype=np.bool_)
    n_iter = np.zeros(P, dtype=np.int64)
    converged = np.zeros(P, dtype=np.bool_)
    if use_numba is None:
        use_numba = HAVE_NUMBA
    if use_numba:
        numba.set_num_threads(max(1, min(n_threads, numba.config.NUMBA_NUM_THREADS)))
        numba.set_parallel_chunksize(1)   # fits differ in length: hand them out one by one
        _ap_batch_numba(np.ascontiguousarray(Sn), sdiags, dampings, int(max_iter),
                        int(convergence_iter), E, n_iter, converged)
    else:
        for p in range(P):
            E[p], n_iter[p], converged[p] = _ap_iterate_numpy(
                Sn, sdiags[p], dampings[p], max_iter, convergence_iter)
    labels = np.full((P, n), -1, dtype=np.int64)
    for p in np.flatnonzero(converged):
        labels[p] = final_labels(Sn, sdiags[p], E[p])
    return labels, n_iter, converged


def ap_exemplars(Sn, z_diag, damping: float, preference: float, max_iter=1000, convergence_iter=15,
                 use_numba=None) -> tuple[np.ndarray, np.ndarray]:
    """One fit of :func:`ap_fits` (same arithmetic), returning (labels (n,), exemplar row
    index (K,) of each label); labels all -1 if it did not converge."""
    dampings = np.asarray([damping], dtype=np.float64)
    sdiags = np.stack([noised_diagonal(float(preference), z_diag)])
    n = Sn.shape[0]
    E = np.zeros((1, n), dtype=np.bool_)
    n_iter = np.zeros(1, dtype=np.int64)
    converged = np.zeros(1, dtype=np.bool_)
    if use_numba is None:
        use_numba = HAVE_NUMBA
    if use_numba:
        _ap_batch_numba(np.ascontiguousarray(Sn), sdiags, dampings, int(max_iter), int(convergence_iter),
                        E, n_iter, converged)
    else:
        E[0], n_iter[0], converged[0] = _ap_iterate_numpy(Sn, sdiags[0], dampings[0], max_iter, convergence_iter)
    if not converged[0]:
        return np.full(n, -1), np.zeros(0, dtype=np.int64)
    return final_labels_and_exemplars(Sn, sdiags[0], E[0])
