# gramstyle server image (CPU). Build from the repository root:
#   docker build -t gramstyle .
#   docker run -p 50051:50051 gramstyle                      # ImageNet VGG19, downloaded at build
#   docker run -p 50051:50051 -v $PWD/models:/models gramstyle \
#       gramstyle serve --port 50051 --arch vgg16 --weights /models/vgg16.pth
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 TORCH_HOME=/opt/torch
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# CPU wheels of torch keep the image small; the fused kernel is compiled against them.
RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        "torch>=2.6,<2.15" "torchvision>=0.21,<0.30"
COPY requirements-build.txt .
RUN pip install -r requirements-build.txt
COPY . .
RUN pip install --no-build-isolation ".[server]" && rm -rf /src/build \
    && gramstyle info
# Bake the default ImageNet VGG19 weights into the image (torchvision's cache under TORCH_HOME).
RUN python -c "import torchvision; torchvision.models.vgg19(weights='IMAGENET1K_V1')"

WORKDIR /
EXPOSE 50051
# SIGTERM drains in-flight calls (see README, "Shutdown").
STOPSIGNAL SIGTERM
CMD ["gramstyle", "serve", "--port", "50051", "--arch", "vgg19", "--weights", "imagenet"]
