# syntax=docker/dockerfile:1
# GPU worker image of the EfficientAD line monitor (also runs capture, publish, run, alarms).
#   docker build -t efficientad-line .
#   docker run --gpus all -v $PWD/configs/line.yaml:/etc/efficientad/line.yaml:ro \
#       -v $PWD/secrets/redis_worker_password:/run/secrets/redis_worker_password:ro \
#       -e EFFICIENTAD_REDIS_URL=redis://redis-host:6379/0 \
#       -e EFFICIENTAD__REDIS__USERNAME=worker \
#       -e EFFICIENTAD__REDIS__PASSWORD_FILE=/run/secrets/redis_worker_password efficientad-line
# The base image brings CUDA, cuDNN, torch and torchvision; `pip install .` keeps them because
# they satisfy pyproject's ranges, and adds the rest (opencv-headless, redis, pydantic, ...).
# torch >= 2.10: older `torch.load(weights_only=True)` can be driven into memory corruption by a
# crafted .pth file (GHSA-63cw-57p8-fm3p / CVE-2026-24747, fixed in 2.10.0); teacher .pth files
# go through that loader. The build fails below if a BASE_IMAGE override brings an older torch.
ARG BASE_IMAGE=pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EFFICIENTAD__LOGGING__JSON_LOGS=true \
    EFFICIENTAD__METRICS__PORT=9400
# Metrics/health listen on 127.0.0.1 by default (config default). To scrape from outside the
# container set EFFICIENTAD__METRICS__HOST=0.0.0.0 and publish the port on a private address, as
# compose.yaml does (127.0.0.1:9400:9400).

WORKDIR /opt/efficientad
COPY pyproject.toml README.md ./
COPY efficientad ./efficientad
COPY models ./models
COPY pipeline ./pipeline
COPY worker ./worker
# fail the build on torch < 2.10, before and after `pip install .` (pip must not downgrade it)
ARG TORCH_CHECK="import sys, torch; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(0 if v >= (2, 10) else 'torch ' + torch.__version__ + ' < 2.10: its weights_only loader has a known bypass')"
RUN python -c "$TORCH_CHECK" \
 && pip install . \
 && python -c "$TORCH_CHECK" \
 && python -c "import efficientad.cli, pipeline.stages.capture, pipeline.stages.publisher, worker.service, models.inference" \
 && efficientad --help > /dev/null

COPY configs/line.yaml /etc/efficientad/line.yaml
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin efficientad \
 && mkdir -p /srv/line \
 && chown efficientad /srv/line
USER efficientad
WORKDIR /srv/line

# /metrics, /healthz (503 when the main loop is stuck), /readyz of the process (metrics.port)
EXPOSE 9400
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('EFFICIENTAD__METRICS__PORT', '9400'), timeout=3)"

ENTRYPOINT ["efficientad"]
CMD ["worker", "--config", "/etc/efficientad/line.yaml"]
