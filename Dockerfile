# syntax=docker/dockerfile:1
# The training image launch/xpk.py runs: its default --image (with --project PROJECT) is the
# tag below. Build and push from the repo root:
#
#   docker build -t gcr.io/PROJECT/ualm-jax:latest .
#   docker push gcr.io/PROJECT/ualm-jax:latest
#
# (`gcloud auth configure-docker gcr.io` once lets docker push there; another registry works
# the same way with `--image REGISTRY/ualm-jax:TAG`.) Dependencies are requirements.lock (every
# version pinned) plus requirements-tpu.txt (jax[tpu] and the libtpu it pins); the lock's CPU
# torch wheel comes from the PyTorch CPU index. The project itself goes in with --no-deps, so
# nothing outside the pins is installed. No credentials are baked in: on GKE, gs:// access
# comes from the pod's identity (see launch/xpk.py).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /app

# The pins first, so this layer is rebuilt only when they change.
COPY requirements.lock requirements-tpu.txt ./
RUN python -m pip install -r requirements.lock -r requirements-tpu.txt \
        -f https://storage.googleapis.com/jax-releases/libtpu_releases.html \
        --extra-index-url https://download.pytorch.org/whl/cpu

# The project (configs/ included: --config paths are relative to /app), without its deps.
COPY . .
RUN python -m pip install --no-deps -e .

ENTRYPOINT ["ualm"]
CMD ["--help"]
