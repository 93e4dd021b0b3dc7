"""Multi-shell DWI synthesized from true FA and NDI maps (``mmfusion simulate --dwi``).

Per voxel, one NODDI-type signal (Zhang et al. 2012, AMICO's own forward model,
``amico.synthesis``)::

    S / S0 = f_iso E_iso + (1 - f_iso) [ v E_ic(kappa, n) + (1 - v) E_ec(kappa, v, n) ]

with ``v`` = the true NDI (intra-cellular volume fraction), ``f_iso`` the CSF partial
volume, ``n`` the fibre direction (a smooth synthetic field) and the Watson
concentration ``kappa`` chosen per voxel so that a tensor fitted to the noiseless
signal on the b <= 1000 shells has the true FA (a table of FA(f_iso, v, kappa),
inverted by interpolation; where the true FA is out of reach for that NDI the nearest
reachable value is used and counted). E_ic: Watson-dispersed sticks (AMICO
``NODDIIntraCellular``, tabulated over kappa and the gradient-fibre angle); E_ec:
Watson-averaged hindered tensor with tortuosity ``d_perp = d_par (1 - v)``; E_iso:
``exp(-b d_iso)``. Rician noise of sigma = S0 / SNR. Units: b s/mm^2, diffusivities
mm^2/s.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Default acquisition: shells (s/mm^2) and directions per shell, b=0 volumes.
DEFAULT_SHELLS = (1000.0, 2000.0, 3000.0)
DEFAULT_DIRECTIONS, DEFAULT_B0 = 30, 6
DEFAULT_SNR = 25.0
S0 = 1000.0
#: Tables: kappa grid (log-spaced, ODI ~0.99 .. 0.02), gradient-fibre |cos| grid.
KAPPA_GRID = np.geomspace(0.02, 64.0, 48)
COS_GRID = np.linspace(0.0, 1.0, 41)
V_GRID = np.linspace(0.0, 1.0, 21)
FISO_GRID = np.linspace(0.0, 1.0, 11)


@dataclass(frozen=True)
class Acquisition:
    """``bvals`` (N,) s/mm^2 and ``bvecs`` (N, 3) unit (zeros for b=0)."""

    bvals: np.ndarray
    bvecs: np.ndarray


def acquisition(rng, shells=DEFAULT_SHELLS, n_directions: int = DEFAULT_DIRECTIONS,
                n_b0: int = DEFAULT_B0) -> Acquisition:
    """Electrostatically spread directions per shell (DIPY ``disperse_charges``), each shell
    its own set; ``n_b0`` b=0 volumes interleaved."""
    from dipy.core.sphere import HemiSphere, disperse_charges

    vecs, vals = [], []
    for b in shells:
        theta = np.arccos(rng.uniform(-1, 1, n_directions))
        phi = rng.uniform(0, 2 * np.pi, n_directions)
        hemi, _ = disperse_charges(HemiSphere(theta=theta, phi=phi), 200)
        vecs.append(hemi.vertices)
        vals.append(np.full(n_directions, float(b)))
    bvecs, bvals = np.concatenate(vecs), np.concatenate(vals)
    order = rng.permutation(len(bvals))
    bvecs, bvals = bvecs[order], bvals[order]
    at = np.linspace(0, len(bvals), n_b0, endpoint=False).astype(int)
    bvals = np.insert(bvals, at, 0.0)
    bvecs = np.insert(bvecs, at, 0.0, axis=0)
    return Acquisition(bvals, bvecs / np.maximum(np.linalg.norm(bvecs, axis=1, keepdims=True), 1e-12)
                       * (bvals[:, None] > 0))


def _amico_scheme(table: np.ndarray):
    import amico.scheme

    return amico.scheme.Scheme(table, 0)


def intra_table(shells, dpar: float) -> np.ndarray:
    """E_ic (n_shells, n_kappa, n_cos) of Watson-dispersed sticks (AMICO ``NODDIIntraCellular``)
    for a fibre along z, tabulated over ``KAPPA_GRID`` and ``COS_GRID``."""
    from amico.synthesis import NODDIIntraCellular

    shells = list(shells)
    sin = np.sqrt(1 - COS_GRID**2)
    rows = [np.array([[1.0, 0, 0, 0]])]
    for b in shells:
        rows.append(np.column_stack([sin, np.zeros_like(sin), COS_GRID, np.full_like(sin, b)]))
    scheme = _amico_scheme(np.concatenate(rows))
    model = NODDIIntraCellular(scheme)
    out = np.empty((len(shells), len(KAPPA_GRID), len(COS_GRID)))
    for k, kappa in enumerate(KAPPA_GRID):
        sig = np.asarray(model.get_signal(dpar, float(kappa))).ravel()[1:]
        out[:, k] = sig.reshape(len(shells), len(COS_GRID))
    return out


def _hindered_coefficients(dpar: float) -> tuple[np.ndarray, np.ndarray]:
    """Watson-averaged hindered diffusivities (AMICO ``NODDIExtraCellular``) as linear
    functions of v: d(v) = a + (1 - v) c, each (n_kappa, 2) [parallel, perpendicular]."""
    from amico.synthesis import NODDIExtraCellular

    ec = NODDIExtraCellular(_amico_scheme(np.array([[1.0, 0, 0, 0], [0, 0, 1.0, 1000.0]])))
    zero = np.array([ec._watson_hindered_diffusion_coeff(dpar, 0.0, k) for k in KAPPA_GRID])
    full = np.array([ec._watson_hindered_diffusion_coeff(dpar, dpar, k) for k in KAPPA_GRID])
    return zero, full - zero


class SignalModel:
    """The per-voxel forward model on one acquisition (see the module docstring)."""

    def __init__(self, acq: Acquisition, dpar: float = 1.7e-3, diso: float = 3.0e-3,
                 dti_max_bval: float = 1000.0):
        self.acq, self.dpar, self.diso = acq, float(dpar), float(diso)
        weighted = acq.bvals > 0
        self.shells = np.unique(np.round(acq.bvals[weighted], -1))
        self.shell_index = np.searchsorted(self.shells, np.round(acq.bvals, -1))
        self.ic = intra_table(self.shells, self.dpar)
        self.ec_a, self.ec_c = _hindered_coefficients(self.dpar)
        self.dti_use = acq.bvals <= dti_max_bval
        self.fa_table = self._fa_table()

    def signal(self, v: np.ndarray, fiso: np.ndarray, log_kappa: np.ndarray, dirs: np.ndarray,
               bvals=None, bvecs=None) -> np.ndarray:
        """Noiseless S/S0 (M, N) for M voxels: ``v``, ``fiso``, ``log_kappa`` (M,), ``dirs`` (M, 3) unit."""
        bvals = self.acq.bvals if bvals is None else bvals
        bvecs = self.acq.bvecs if bvecs is None else bvecs
        shell_index = np.searchsorted(self.shells, np.round(bvals, -1))
        cos = np.abs(dirs @ bvecs.T)  # (M, N)
        lk = np.log(KAPPA_GRID)
        kpos = np.clip(np.interp(log_kappa, lk, np.arange(len(lk))), 0, len(lk) - 1)
        k0 = np.minimum(kpos.astype(int), len(lk) - 2)
        wk = (kpos - k0)[:, None]
        cpos = cos * (len(COS_GRID) - 1)
        c0 = np.minimum(cpos.astype(int), len(COS_GRID) - 2)
        wc = cpos - c0
        out = np.ones(cos.shape)
        for j, b in enumerate(bvals):
            if b <= 0:
                continue
            tab = self.ic[shell_index[j]]
            e00, e01 = tab[k0, c0[:, j]], tab[k0, c0[:, j] + 1]
            e10, e11 = tab[k0 + 1, c0[:, j]], tab[k0 + 1, c0[:, j] + 1]
            w = wc[:, j]
            e_ic = (1 - wk[:, 0]) * ((1 - w) * e00 + w * e01) + wk[:, 0] * ((1 - w) * e10 + w * e11)
            d = ((1 - wk) * (self.ec_a[k0] + (1 - v)[:, None] * self.ec_c[k0])
                 + wk * (self.ec_a[k0 + 1] + (1 - v)[:, None] * self.ec_c[k0 + 1]))
            e_ec = np.exp(-b * ((d[:, 0] - d[:, 1]) * cos[:, j] ** 2 + d[:, 1]))
            e_iso = np.exp(-b * self.diso)
            out[:, j] = fiso * e_iso + (1 - fiso) * (v * e_ic + (1 - v) * e_ec)
        return out

    def _fa_table(self) -> np.ndarray:
        """FA (n_fiso, n_v, n_kappa) of a tensor fitted (DIPY, OLS) to the noiseless signal
        of a fibre along z on the b <= dti_max_bval volumes."""
        from dipy.core.gradients import gradient_table
        from dipy.reconst.dti import TensorModel

        f, v, k = np.meshgrid(FISO_GRID, V_GRID, np.log(KAPPA_GRID), indexing="ij")
        z = np.tile([0.0, 0.0, 1.0], (f.size, 1))
        use = self.dti_use
        sig = self.signal(v.ravel(), f.ravel(), k.ravel(), z, self.acq.bvals[use], self.acq.bvecs[use])
        gtab = gradient_table(self.acq.bvals[use], bvecs=self.acq.bvecs[use], b0_threshold=0)
        fa = TensorModel(gtab, fit_method="OLS").fit(sig).fa
        return np.nan_to_num(fa).reshape(f.shape)

    def kappa_for(self, fa: np.ndarray, v: np.ndarray, fiso: np.ndarray) -> tuple[np.ndarray, int]:
        """log kappa (M,) whose noiseless tensor FA equals ``fa`` (M,) at ``v``, ``fiso``;
        and how many voxels were out of reach (set to the nearest reachable FA)."""
        from scipy.interpolate import RegularGridInterpolator

        interp = RegularGridInterpolator((FISO_GRID, V_GRID), np.moveaxis(self.fa_table, 2, 0).reshape(
            len(KAPPA_GRID), -1).T.reshape(len(FISO_GRID), len(V_GRID), len(KAPPA_GRID)))
        rows = interp(np.column_stack([np.clip(fiso, 0, 1), np.clip(v, 0, 1)]))  # (M, K), rising in kappa
        rows = np.maximum.accumulate(rows, axis=1)
        lk = np.log(KAPPA_GRID)
        idx = np.clip((rows < fa[:, None]).sum(1), 1, len(lk) - 1)
        lo, hi = rows[np.arange(len(fa)), idx - 1], rows[np.arange(len(fa)), idx]
        w = np.clip((fa - lo) / np.maximum(hi - lo, 1e-9), 0, 1)
        out_of_reach = int(np.sum((fa < rows[:, 0] - 0.01) | (fa > rows[:, -1] + 0.01)))
        return lk[idx - 1] + w * (lk[idx] - lk[idx - 1]), out_of_reach


def direction_field(rng, shape: tuple, sigma_vox: float) -> np.ndarray:
    """(X, Y, Z, 3) unit fibre directions: a smooth random vector field (Gaussian, ``sigma_vox``)."""
    from scipy import ndimage

    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox) for _ in range(3)], -1)
    field[..., 2] += 0.3 * field.std()  # a mild preferred axis: few voxels have no direction at all
    return field / np.maximum(np.linalg.norm(field, axis=-1, keepdims=True), 1e-12)


def synthesize(rng, model: SignalModel, fa: np.ndarray, ndi: np.ndarray, fiso: np.ndarray,
               mask: np.ndarray, snr: float = DEFAULT_SNR, direction_sigma_vox: float = 3.0) -> tuple[np.ndarray, dict]:
    """The DWI (X, Y, Z, N) float32 of true ``fa``, ``ndi`` and CSF fraction ``fiso`` (X, Y, Z)
    inside ``mask``, S0 = 1000, Rician noise sigma = S0 / ``snr`` everywhere (outside the
    mask: noise only). Returns (dwi, info) with info the out-of-reach count and settings."""
    dirs = direction_field(rng, mask.shape, direction_sigma_vox)[mask]
    v = np.clip(ndi[mask], 0.0, 1.0)
    f = np.clip(fiso[mask], 0.0, 1.0)
    log_kappa, out_of_reach = model.kappa_for(np.clip(fa[mask], 0.0, 1.0), v, f)
    n = len(model.acq.bvals)
    clean = np.zeros(mask.shape + (n,), np.float32)
    for chunk in np.array_split(np.arange(len(v)), max(1, len(v) // 20000)):
        clean[tuple(np.argwhere(mask)[chunk].T)] = S0 * model.signal(v[chunk], f[chunk], log_kappa[chunk], dirs[chunk])
    sigma = S0 / float(snr)
    noisy = np.sqrt((clean + sigma * rng.standard_normal(clean.shape, dtype=np.float32)) ** 2
                    + (sigma * rng.standard_normal(clean.shape, dtype=np.float32)) ** 2).astype(np.float32)
    info = {"model": "NODDI-type: f_iso ball + (1 - f_iso) (v Watson sticks + (1 - v) Watson hindered tensor)",
            "forward_model": "amico.synthesis (NODDIIntraCellular, NODDIExtraCellular hindered coefficients)",
            "parallel_diffusivity_mm2_per_s": model.dpar, "isotropic_diffusivity_mm2_per_s": model.diso,
            "snr_b0": float(snr), "noise": "Rician", "S0": S0,
            "kappa_from": "true FA, via the FA of a tensor fitted to the noiseless b <= 1000 signal",
            "voxels_fa_out_of_reach": out_of_reach, "voxels": int(mask.sum())}
    return noisy, info
