#!/bin/sh
# The official haproxy image's entrypoint contract, around Debian's haproxy
# (a stand-in, see ../README.md).
set -e

# Options as the first argument: they are haproxy's.
if [ "${1#-}" != "$1" ]; then
    set -- haproxy "$@"
fi

# haproxy itself: master-worker (-W, reload on SIGUSR2) in the foreground
# (-db), logging where the configuration says (stdout in the compose rig).
if [ "$1" = haproxy ]; then
    shift
    set -- haproxy -W -db "$@"
fi

exec "$@"
