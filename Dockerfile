# One image for the server, the dashboard and CPU workers; docker/Dockerfile.worker-cuda adds CUDA workers.
# The recipes (docker-compose.yml, deploy/kubernetes/) rely on: the entrypoint `tunefleet` (server stage) or
# `tunefleet worker`, the user tunefleet with uid 10001 in every image (so token files of mode 600 written by
# one container are readable by the others), and the folders under /var/lib/tunefleet and /artifacts, owned
# by that user so that an empty volume mounted there is writable.
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TUNEFLEET_HOME=/var/lib/tunefleet HF_HOME=/var/lib/tunefleet/cache/huggingface
RUN useradd --uid 10001 --create-home tunefleet \
 && mkdir -p /var/lib/tunefleet/tokens /var/lib/tunefleet/cache /var/lib/tunefleet/work /artifacts /data \
 && chown -R tunefleet:tunefleet /var/lib/tunefleet /artifacts
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
# One package, tunefleet: its service/, workers/ and migrations/ are links to the folders above.
COPY tunefleet ./tunefleet

# The server needs no torch.
FROM base AS server
RUN pip install .
USER tunefleet
EXPOSE 8000
ENTRYPOINT ["tunefleet"]
CMD ["server", "--host", "0.0.0.0", "--port", "8000"]

# A worker without CUDA libraries in the image (runs on CPU); for GPUs build docker/Dockerfile.worker-cuda.
FROM base AS worker-cpu
RUN pip install "torch==2.13.0" && pip install ".[worker,demo]"
USER tunefleet
WORKDIR /data
ENTRYPOINT ["tunefleet", "worker"]
CMD ["--device", "cpu", "--workdir", "/var/lib/tunefleet/work/cpu"]
