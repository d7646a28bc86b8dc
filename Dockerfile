# One image for the server, the dashboard and CPU workers; docker/Dockerfile.worker-cuda adds CUDA workers.
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
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
RUN useradd --create-home tunefleet
USER tunefleet
EXPOSE 8000
ENTRYPOINT ["tunefleet"]
CMD ["server", "--host", "0.0.0.0", "--port", "8000"]

# A worker without CUDA libraries in the image (runs on CPU); for GPUs build docker/Dockerfile.worker-cuda.
FROM base AS worker-cpu
RUN pip install "torch==2.13.0" && pip install ".[worker,demo]"
RUN useradd --create-home tunefleet
USER tunefleet
ENTRYPOINT ["tunefleet", "worker"]
