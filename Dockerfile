# syntax=docker/dockerfile:1
# One Dockerfile, three images: build each with its target, e.g.
#   docker build --target sender -t llm-dispatcher-sender .
# The base is pinned to an exact Python release; pin its digest too in production
# (docker build --build-arg PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# Dependencies only, in a virtualenv the final images copy. Every dependency ships
# manylinux wheels, so no compiler is needed here either.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY contract contract
COPY runtime runtime
COPY sender sender
COPY consumer consumer
COPY simulator simulator
# The project itself is uninstalled again: the images run it from /app, where db-init/
# sits beside the packages exactly as in the repository.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install . \
    && /opt/venv/bin/pip uninstall --yes llm-dispatcher pip setuptools

FROM ${PYTHON_IMAGE} AS base
RUN groupadd --system --gid 10001 dispatcher \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin dispatcher
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY contract contract
COPY runtime runtime
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

FROM base AS sender
COPY sender sender
COPY db-init db-init
ENV SENDER_HOST=0.0.0.0
EXPOSE 8080
CMD ["python", "-m", "sender"]

FROM base AS consumer
COPY consumer consumer
ENV CONSUMER_STATUS_HOST=0.0.0.0
EXPOSE 9400
CMD ["python", "-m", "consumer"]

FROM base AS simulator
COPY simulator simulator
ENV SIMULATOR_HOST=0.0.0.0
EXPOSE 8000
CMD ["python", "-m", "simulator"]
