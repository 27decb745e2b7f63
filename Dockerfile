# gramstyle server image, CPU. (GPU: Dockerfile.cuda.) Build from the repository root:
#
#   docker build -t gramstyle .                                  # bakes ImageNet VGG19 in
#   docker build -t gramstyle --build-arg BAKE_IMAGENET=0 .      # no download at build time
#   docker run --rm -p 50051:50051 -p 9100:9100 --stop-timeout 40 gramstyle
#   docker run --rm -p 50051:50051 -v "$PWD/models:/models:ro" gramstyle \
#       serve --arch vgg16 --weights /models/vgg16-hed-bsds500.pth
#
# Two stages: `build` has the compilers, compiles the fused op and installs everything into
# the virtual environment /opt/venv; `runtime` gets only that venv (and the baked weights):
# no compiler, no build tools, no source tree, no .git. It runs as the unprivileged UID
# 10001. `docker stop` must wait longer than serve's --grace (30 s by default) so that
# in-flight calls finish: use --stop-timeout / `docker stop -t` > --grace. See
# docs/deploy.md.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ------------------------------------------------------------------------------------ build
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    TORCH_HOME=/opt/torch
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
# The CPU wheels of torch keep the image small; the op is compiled against them, and the
# wheel it goes into then requires exactly this torch.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        "torch>=2.6,<2.15" "torchvision>=0.21,<0.30"
WORKDIR /src
COPY requirements-build.txt ./
RUN pip install --no-cache-dir -r requirements-build.txt
COPY pyproject.toml setup.py README.md LICENSE ./
COPY proto ./proto
COPY src ./src
COPY server ./server
COPY kernels ./kernels
COPY client ./client
COPY engine ./engine
COPY cli ./cli
# A regular (not editable) install: the venv holds gramstyle and its compiled op, so the
# source tree stays behind in this stage. Then drop what only the build needed.
# DL3013 (pin pip versions) does not fit: "." is this source tree, and its dependencies are
# pinned by requirements-build.txt and the torch it was compiled against.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-build-isolation ".[server]" \
    && pip uninstall -y grpcio-tools ninja \
    && python -c "from gramstyle import kernels as k; assert k.backend() == 'cpu', k.load_error()"

# Offline weights: bake torchvision's ImageNet VGG19 into TORCH_HOME (needs internet at build
# time), or build with BAKE_IMAGENET=0 and mount weights at run time (docs/deploy.md).
ARG BAKE_IMAGENET=1
RUN mkdir -p /opt/torch \
    && if [ "$BAKE_IMAGENET" = "1" ]; then \
        python -c "import torchvision; torchvision.models.vgg19(weights='IMAGENET1K_V1')"; \
    fi

# ---------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="gramstyle" \
      org.opencontainers.image.description="Gatys neural style transfer as a gRPC service (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"

# HOME and the caches point at /tmp, the one writable place when the root filesystem is
# read-only (Kubernetes mounts an emptyDir there).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TORCH_HOME=/opt/torch \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    GRAMSTYLE_HOST=[::] \
    GRAMSTYLE_PORT=50051 \
    GRAMSTYLE_METRICS_HOST=[::] \
    GRAMSTYLE_METRICS_PORT=9100

RUN groupadd --system --gid 10001 gramstyle \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gramstyle
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/torch /opt/torch

USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9100
# SIGTERM drains: health turns NOT_SERVING, in-flight calls get --grace seconds.
STOPSIGNAL SIGTERM
# The gRPC health service, through the CLI's torch-free client. With TLS on the main port,
# set GRAMSTYLE_HEALTH_PORT (a plaintext health-only port) and the check uses it.
# (`|| exit 1`: Docker reserves exit status 2, which the CLI uses for a flag mistake.)
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["/bin/sh", "-c", "gramstyle health --timeout 5 --server localhost:${GRAMSTYLE_HEALTH_PORT:-${GRAMSTYLE_PORT:-50051}} || exit 1"]
ENTRYPOINT ["gramstyle"]
CMD ["serve"]
