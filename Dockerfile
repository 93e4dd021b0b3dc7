# mmfusion BIDS-App image: TensorFlow with CUDA (pip wheels; the host driver comes in with
# `docker run --gpus all` / `apptainer run --nv`), ANTsPy, the package and its built-in
# template (nilearn ships MNI152 2009 inside its wheel), so nothing is downloaded at run time.
#
#   docker build -t mmfusion:$(cat version) --build-arg VERSION=$(cat version) .
#   docker build -t mmfusion:$(cat version)-cpu --build-arg VERSION=$(cat version) \
#       --build-arg TENSORFLOW=tensorflow .             # CPU-only (no CUDA wheels; docs/hpc.md)
#   docker run --rm mmfusion:0.3.0                      # --help
#   docker run --rm --gpus all -v /data/bids:/bids:ro -v /data/out:/out \
#       mmfusion:0.3.0 /bids /out participant --participant-label 01
#
# Plain Dockerfile syntax: the legacy builder and BuildKit build it alike (no `# syntax=` line,
# which makes BuildKit fetch a frontend image, no `RUN --network`); that nothing is downloaded at
# run time is checked with `docker run --network none` (.ci/container_run.sh).
#
# Versions: requirements.lock (the one locked set that the README commands, CI and both images
# install; scripts/refresh_lock.sh refreshes it). Singularity.def installs the same way
# (tests/test_hpc.py keeps the images, the lock and pyproject.toml in step).
FROM python:3.11.7-slim-bookworm

ARG VERSION=0.3.0
# The TensorFlow requirement: "tensorflow[and-cuda]" (GPU: the CUDA wheels) or "tensorflow" (CPU only)
ARG TENSORFLOW="tensorflow[and-cuda]"

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

# libgomp1: numba's thread-safe OpenMP threading layer (without it numba falls back to its
# "workqueue" layer, which is not safe under tf.data's threads: the training losses became NaN).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
# (DL3008 "pin versions": the bookworm package of the base image's release)

# Third-party dependencies first (one cached layer): pyproject's dependencies, plus the CUDA
# wheels of tensorflow[and-cuda] (unless TENSORFLOW=tensorflow), at exactly the versions of
# requirements.lock.
WORKDIR /opt/mmfusion
COPY requirements.lock pyproject.toml ./
# hadolint ignore=DL3013
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /tmp/deps.txt \
    && pip install --no-cache-dir -c requirements.lock -r /tmp/deps.txt "${TENSORFLOW}" \
    && rm /tmp/deps.txt
# (DL3013 "pin versions": every version comes from the constraints file requirements.lock)

# The package itself (deps already satisfied: --no-deps keeps the locked versions authoritative).
COPY version README.md run.py ./
COPY mmfusion ./mmfusion
RUN test "$(cat version)" = "${VERSION}" \
        || { echo "build-arg VERSION=${VERSION} differs from the version file ($(cat version)); pass --build-arg VERSION=\$(cat version)" >&2; exit 1; } \
    && pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info \
    && useradd --create-home --uid 1000 --shell /bin/bash mmfusion

# Numeric uid (the "mmfusion" user made above) so hosts and Kubernetes can resolve it.
USER 1000:1000
# The package imports, numba's OpenMP layer loads and the built-in MNI152 template loads
# (without network: checked at run time).
RUN python -c "import mmfusion, nilearn.datasets as d, numba.np.ufunc.omppool; d.load_mni152_template(resolution=1); print('mmfusion', mmfusion.__version__)"

ENTRYPOINT ["python", "/opt/mmfusion/run.py"]
CMD ["--help"]
