# syntax=docker/dockerfile:1
# GPU worker image of the EfficientAD line monitor (also runs capture, publish, run, alarms).
#   docker build -t efficientad-line .
#   docker run --gpus all -v $PWD/configs/line.yaml:/etc/efficientad/line.yaml:ro \
#       -e EFFICIENTAD_REDIS_URL=redis://redis-host:6379/0 efficientad-line
# The base image brings CUDA, cuDNN, torch and torchvision; `pip install .` keeps them because
# they satisfy pyproject's ranges, and adds the rest (opencv-headless, redis, pydantic, ...).
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EFFICIENTAD__LOGGING__JSON_LOGS=true \
    EFFICIENTAD__METRICS__PORT=9400

WORKDIR /opt/efficientad
COPY pyproject.toml README.md ./
COPY efficientad ./efficientad
COPY models ./models
COPY pipeline ./pipeline
COPY worker ./worker
RUN pip install . \
 && python -c "import efficientad.cli, pipeline.capture, worker.service, models.inference" \
 && efficientad --help > /dev/null

COPY configs/line.yaml /etc/efficientad/line.yaml
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin efficientad \
 && mkdir -p /srv/line \
 && chown efficientad /srv/line
USER efficientad
WORKDIR /srv/line

# /metrics, /healthz, /readyz of the process (metrics.port)
EXPOSE 9400
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('EFFICIENTAD__METRICS__PORT', '9400'), timeout=3)"

ENTRYPOINT ["efficientad"]
CMD ["worker", "--config", "/etc/efficientad/line.yaml"]
