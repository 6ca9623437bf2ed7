# Gimme seller and buyer image. Ubuntu 22.04 because the openfhe wheel carries a
# CPython 3.10 extension built there (it installs, then fails to import, on 3.11).
FROM ubuntu:22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    OMP_WAIT_POLICY=PASSIVE
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY protos protos
COPY common common
COPY seller_server seller_server
COPY buyer_client buyer_client
COPY examples examples
COPY scripts scripts
RUN python3 -m venv /opt/gimme \
 && /opt/gimme/bin/pip install . \
 && /opt/gimme/bin/python examples/build.py --out /app/demo
ENV PATH=/opt/gimme/bin:$PATH

# non-root; compose may run it as the host user (GIMME_UID) so TLS secrets stay 0600
RUN useradd --create-home --uid 10001 gimme \
 && mkdir -p /data && chmod 0777 /data
USER gimme
EXPOSE 50051
HEALTHCHECK --interval=5s --timeout=10s --start-period=120s --retries=30 \
  CMD gimme-seller health --address localhost:50051 --tls-dir /run/secrets || exit 1
CMD ["gimme-seller", "--help"]
