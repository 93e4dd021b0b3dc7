# syntax=docker/dockerfile:1
# mmfusion BIDS-App image: TensorFlow with CUDA (pip wheels; the host driver comes in with
# `docker run --gpus all` / `apptainer run --nv`), ANTsPy, the package and its built-in
# template (nilearn ships MNI152 2009 inside its wheel), so nothing is downloaded at run time.
#
#   docker build -t mmfusion:$(cat version) --build-arg VERSION=$(cat version) .
#   docker run --rm mmfusion:0.2.0                      # --help
#   docker run --rm --gpus all -v /data/bids:/bids:ro -v /data/out:/out \
#       mmfusion:0.2.0 /bids /out participant --participant-label 01
#
# Versions are pinned to the environment the test suite ran in; Singularity.def carries the
# same pins (tests/test_hpc.py keeps the two and pyproject.toml in step).
FROM python:3.11.7-slim-bookworm

ARG VERSION=0.2.0

LABEL org.opencontainers.image.title="mmfusion" \
      org.opencontainers.image.description="BIDS-App: multimodal 3D brain MRI -> learned embeddings and data-driven subject strata" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/mmfusion/mmfusion" \
      org.opencontainers.image.documentation="docs/hpc.md"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    NUMBA_CACHE_DIR=/tmp/numba \
    TF_CPP_MIN_LOG_LEVEL=1

# Third-party dependencies first (one cached layer); pins = the tested environment.
RUN pip install --no-cache-dir \
        "tensorflow[and-cuda]==2.21.0" \
        "keras==3.15.1" \
        "antspyx==0.6.3" \
        "nibabel==5.4.2" \
        "pybids==0.22.0" \
        "h5py==3.14.0" \
        "numpy==2.3.5" \
        "scipy==1.15.3" \
        "scikit-learn==1.9.1" \
        "statsmodels==0.15.0" \
        "PyYAML==6.0.3" \
        "nilearn==0.14.1" \
        "matplotlib==3.11.2" \
        "pandas==3.1.1" \
        "numba==0.68.1" \
        "llvmlite==0.50.0" \
        "bids-validator-deno==3.0.2"

# The package itself (deps already satisfied: --no-deps keeps the pins above authoritative).
WORKDIR /opt/mmfusion
COPY version pyproject.toml README.md run.py ./
COPY mmfusion ./mmfusion
RUN test "$(cat version)" = "${VERSION}" \
        || { echo "build-arg VERSION=${VERSION} differs from the version file ($(cat version)); pass --build-arg VERSION=\$(cat version)" >&2; exit 1; } \
    && pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info \
    && useradd --create-home --uid 1000 --shell /bin/bash mmfusion

# Numeric uid (the "mmfusion" user made above) so hosts and Kubernetes can resolve it.
USER 1000:1000
# Offline check: the package imports and the built-in MNI152 template loads without network.
RUN --network=none python -c "import mmfusion, nilearn.datasets as d; d.load_mni152_template(resolution=1); print('mmfusion', mmfusion.__version__)"

ENTRYPOINT ["python", "/opt/mmfusion/run.py"]
CMD ["--help"]
