# syntax=docker/dockerfile:1
# One image for every Lethe process: the API (`serve`, the default), the workers (`worker`), the
# migration job (`db upgrade`) and the admin commands (`keys create`). docker-compose.yml runs it.
#
#   docker build -t lethe .                                                         # CUDA (default)
#   docker build -t lethe:cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# The default PyPI wheels of torch for Linux x86_64 bundle the CUDA runtime, cuDNN and NCCL as
# nvidia-* dependency wheels, so the image needs no CUDA base image: the host provides only the
# NVIDIA driver and the NVIDIA Container Toolkit. They are also why the image weighs several GB;
# TORCH_INDEX_URL swaps in PyTorch's CPU-only wheels for an API-only or CPU image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: resolve and install everything into /opt/venv ----
FROM ${PYTHON_IMAGE} AS build

ARG TORCH_INDEX_URL=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app

# Dependencies first, from pyproject.toml alone, so that a code change does not reinstall torch.
# torch/torchvision keep their pyproject pins whichever index they come from.
COPY pyproject.toml README.md ./
RUN python - <<'EOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
name = lambda req: re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower()
torch = [d for d in deps if name(d) in ("torch", "torchvision")]
open("/tmp/torch.txt", "w").write("\n".join(torch) + "\n")
open("/tmp/requirements.txt", "w").write("\n".join(d for d in deps if d not in torch) + "\n")
EOF
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} -r /tmp/torch.txt \
 && pip install -r /tmp/requirements.txt

# Editable on purpose: service/db.py finds Alembic's migrations/ beside the service package
# (/app/migrations), which a plain wheel install into site-packages would leave behind.
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps -e . \
 && python -m compileall -q service worker migrations

# ---- runtime: the interpreter, /opt/venv and the code; no compiler, no pip cache ----
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LETHE_HOME=/var/lib/lethe

RUN groupadd --system --gid 10001 lethe \
 && useradd --system --uid 10001 --gid lethe --home-dir /var/lib/lethe --no-create-home \
            --shell /usr/sbin/nologin lethe \
 && install -d -o lethe -g lethe -m 0750 /var/lib/lethe

# Owned by root: the code and its dependencies are read-only to the process that runs them.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app

USER 10001:10001
EXPOSE 8000

# Liveness of the API. Containers that serve no HTTP (workers) override it in docker-compose.yml.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

ENTRYPOINT ["lethe"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
