# strata in a container. The steps are those of scripts/install.sh, which this file runs: keep the two in step
# (a change to how strata is built or installed goes into install.sh; this file only calls it).
# It is not built on the project's development machines (they cannot pull images); build it where Docker can:
#   docker build -t strata .
#   docker run --rm -p 8100:8100 strata                      # serves the bundled model on port 8100
#   docker run --rm --network host -v /etc/strata:/etc/strata:ro -v /srv/models:/models:ro strata \
#       worker --listen 0.0.0.0:50051 --secret-file /etc/strata/secret -m /models/Qwen3-1.7B-8bit
# CPU only: the CUDA backend needs the CUDA toolkit image as the base (nvidia/cuda:*-devel to build, *-runtime
# to run) and `--cuda 1` below.

FROM debian:12-slim AS build
WORKDIR /src
# only what the build needs (the working tree may hold large build directories)
COPY Makefile README.md ./
COPY include include
COPY src src
COPY scripts scripts
COPY models models
COPY docs docs
RUN scripts/install.sh --prefix /opt/strata --build-dir /tmp/strata-build --cuda 0 \
    && rm -rf /tmp/strata-build /var/lib/apt/lists/*

FROM debian:12-slim
COPY scripts/install.sh /tmp/install.sh
RUN /tmp/install.sh --runtime-deps && rm -rf /var/lib/apt/lists/* /tmp/install.sh \
    && useradd --system --create-home --home-dir /var/lib/strata --shell /usr/sbin/nologin strata
COPY --from=build /opt/strata /opt/strata
USER strata
WORKDIR /var/lib/strata
ENV PATH=/opt/strata/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
EXPOSE 8100 50051
ENTRYPOINT ["strata"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8100"]
