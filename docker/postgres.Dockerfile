# PostgreSQL for docker/compose.host.yml, where the postgres image cannot be pulled: Debian's own
# PostgreSQL (15, bookworm's) installed on a Debian base made here, run as the postgres user.
#
#   docker build --network host --build-arg BASE=cicd-test-base:bookworm -f docker/postgres.Dockerfile -t cicd-postgres:15 docker
ARG BASE=debian:bookworm-slim
FROM ${BASE}

# No cluster at install time (Debian's postinst would make 15/main): docker/postgres-start.sh
# makes the one cluster in the data volume, on its first start.
RUN set -eux; \
    mkdir -p /etc/postgresql-common; \
    echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf; \
    apt-get update; \
    apt-get install -y --no-install-recommends postgresql-15; \
    rm -rf /var/lib/apt/lists/*; \
    mkdir -p /var/lib/postgresql/data /var/run/postgresql; \
    chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql

COPY postgres-start.sh /usr/local/bin/postgres-start
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
USER postgres
# exec'd by the script: postgres is the container's main process and gets SIGTERM (a fast shutdown).
CMD ["postgres-start"]
