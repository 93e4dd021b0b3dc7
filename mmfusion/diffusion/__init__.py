"""Diffusion science: checks of a DWI series and its gradients, the tensor (DIPY) and NODDI
(AMICO) fits, and the multi-shell signal synthesis of ``mmfusion simulate --dwi``.

Arrays in, arrays out: file discovery and writing live in :mod:`mmfusion.io.bids` and
:mod:`mmfusion.io.dwi`, the per-subject order in :mod:`mmfusion.levels.participant`.
"""
