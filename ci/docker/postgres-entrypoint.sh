#!/bin/sh
# The entrypoint of the locally built spillway-postgres image: the part of the official
# postgres image's interface the tests use. As root with `postgres ...` as the command, it
# initialises $PGDATA once (trust or the POSTGRES_HOST_AUTH_METHOD given, plus
# POSTGRES_INITDB_ARGS), then runs the command as the postgres user.
set -e
if [ "$1" = postgres ] && [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chown postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 700 "$PGDATA"
  if [ ! -s "$PGDATA/PG_VERSION" ]; then
    # shellcheck disable=SC2086 # POSTGRES_INITDB_ARGS is a list of words
    runuser -u postgres -- initdb -D "$PGDATA" -U postgres -E UTF8 --locale=C \
      -A "${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" $POSTGRES_INITDB_ARGS
  fi
  exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"
fi
exec "$@"
