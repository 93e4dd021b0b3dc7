"""mmfusion: multimodal 3D brain MRI -> learned embeddings and data-driven subject strata."""
from mmfusion._version import __version__

__all__ = ["__version__"]
