# PostgreSQL for the tests, from Debian's packages; sourced by .ci/run (and usable by hand: `source
# .ci/postgres.sh && postgres_start`). The server refuses to run as root, so every server-side command runs as
# the `postgres` system user through pg_ctlcluster/runuser.
PG_DB=autotune_test
PG_ROLE=autotune
PG_PASSWORD=autotune-test

postgres_cluster() {
    # The newest installed major version, and its `main` cluster (created by the package, or here).
    PG_VERSION=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$PG_VERSION main"; then
        pg_createcluster "$PG_VERSION" main >/dev/null
    fi
}

postgres_start() {
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
    postgres_cluster
    PG_PORT=$(pg_lsclusters -h | awk -v v="$PG_VERSION" '$1 == v && $2 == "main" {print $3}')
    if ! pg_lsclusters -h | awk -v v="$PG_VERSION" '$1 == v && $2 == "main" {print $4}' | grep -qx online; then
        pg_ctlcluster "$PG_VERSION" main start -o "-c listen_addresses=127.0.0.1"
        PG_STARTED_HERE=1
    fi
    runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -d postgres <<SQL
SELECT 'CREATE ROLE $PG_ROLE LOGIN PASSWORD ''$PG_PASSWORD'''
    WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_ROLE')\gexec
SELECT 'CREATE DATABASE $PG_DB OWNER $PG_ROLE'
    WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DB')\gexec
SQL
    AUTOTUNE_TEST_POSTGRES_URL="postgresql+psycopg://$PG_ROLE:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"
    echo "PostgreSQL $PG_VERSION on 127.0.0.1:$PG_PORT, database $PG_DB"
}

postgres_stop() {
    if [ "${PG_STARTED_HERE:-0}" = 1 ]; then
        pg_ctlcluster "$PG_VERSION" main stop || true
    fi
}
