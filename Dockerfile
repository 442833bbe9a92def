# bids_ctp BIDS-App image.
#   docker build -t bids/ctp:0.1.0 .
#   docker run --rm -u "$(id -u):$(id -g)" -v /data/ds:/data:ro -v /data/out:/out \
#       bids/ctp:0.1.0 /data /out participant
# Two stages: the build stage installs the package into /opt/venv; the runtime stage copies only
# that venv onto a fresh base, so no build tools, pip cache or source tree are left in the image.
FROM debian:bookworm-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3=3.11.2-1+b1 python3-venv=3.11.2-1+b1 \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY bids_ctp ./bids_ctp
# pytest is kept in the image so the test suite can be run against the installed app
# (docker run --entrypoint pytest ..., see .circleci/config.yml).
RUN pip install --no-cache-dir . pytest==9.2.0 pytest-xdist==3.8.0 \
 && find /opt/venv/lib -type d -name tests -prune -exec rm -rf {} + \
 && python -m compileall -q /opt/venv/lib \
 && bids_ctp --version

FROM debian:bookworm-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="bids_ctp" \
      org.opencontainers.image.description="BIDS-App: quantitative CT perfusion maps (CBF, CBV, MTT, Tmax, TTP) from 4D CTP" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/bids-apps/bids_ctp" \
      org.opencontainers.image.url="https://github.com/bids-apps/bids_ctp" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3=3.11.2-1+b1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 1000 --user-group --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin bidsctp
COPY --from=build /opt/venv /opt/venv
# Everything the app (and nipype, matplotlib) writes goes to /tmp or to the mounted output and
# work folders, so the image works with `docker run --read-only -v /tmp:/tmp`, with any
# `-u uid:gid` (no passwd entry needed) and as an Apptainer/Singularity SIF.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    TMPDIR=/tmp \
    MPLCONFIGDIR=/tmp/.bids_ctp-matplotlib \
    NIPYPE_NO_ET=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BIDS_CTP_CONTAINER_TYPE=docker \
    BIDS_CTP_CONTAINER_TAG=bids/ctp:${VERSION}
WORKDIR /tmp
USER 1000:1000
ENTRYPOINT ["bids_ctp"]
