#!/bin/sh
# /bin/prometheus in the stand-in for prom/prometheus (see ../README.md):
# Debian's prometheus with the official binary's default storage path.
# Debian patches it to /var/lib/prometheus/metrics2/; the official default
# is data/, relative to the working directory (/prometheus, the image's
# volume), and docker-compose.yml, which gives no --storage.tsdb.path,
# relies on that. A --storage.tsdb.path given is used as given.
for arg; do
    case "$arg" in
        --storage.tsdb.path | --storage.tsdb.path=*) exec /usr/lib/prometheus/prometheus "$@" ;;
    esac
done
exec /usr/lib/prometheus/prometheus --storage.tsdb.path=data/ "$@"
