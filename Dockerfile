# RemoteRun in a container, in two stages: a venv built from wheels, then a slim runtime.
#
#   make image                     # = pip wheel . -w dist/wheels, then docker build
#   docker run -p 8080:8080 -v $PWD/config.toml:/etc/remoterun/config.toml remoterun
#
# BASE is any Debian bookworm image: the registry's debian:bookworm-slim, or one imported
# locally (debootstrap --variant=minbase bookworm DIR; tar -C DIR -c . | docker import - NAME)
# where no registry is reachable. python3 is installed from apt only when BASE lacks it, and
# the wheels come from the build context (dist/wheels, with the page's xterm.js inside), so
# the build needs no network when BASE has python3.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
RUN python3 -c "import venv, ensurepip" 2>/dev/null || { apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; }
COPY dist/wheels/ /wheels/
RUN python3 -m venv /opt/remoterun \
 && /opt/remoterun/bin/pip install --no-cache-dir --no-index --find-links /wheels remoterun \
 && /opt/remoterun/bin/remoterun --version

FROM ${BASE}
RUN command -v python3 >/dev/null || { apt-get update \
      && apt-get install -y --no-install-recommends python3 \
      && rm -rf /var/lib/apt/lists/*; }
RUN useradd --system --user-group --home-dir /var/lib/remoterun --create-home \
      --shell /usr/sbin/nologin remoterun
COPY --from=build /opt/remoterun /opt/remoterun
COPY scripts/ /srv/remoterun/scripts/
COPY deploy/container.toml /etc/remoterun/config.toml
USER remoterun
WORKDIR /var/lib/remoterun
VOLUME ["/var/lib/remoterun"]
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s \
  CMD ["/opt/remoterun/bin/python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["/opt/remoterun/bin/remoterun"]
CMD ["serve", "--config", "/etc/remoterun/config.toml"]
