#!/bin/sh
# The official redis image's entrypoint contract, around Debian's
# redis-server (a stand-in, see ../README.md).
set -e

# Options (or a .conf file) as the first argument: they are redis-server's.
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
    set -- redis-server "$@"
fi

# Started as root: give the working directory to redis, and run this script
# again as redis.
if [ "$1" = redis-server ] && [ "$(id -u)" = 0 ]; then
    find . \! -user redis -exec chown redis '{}' +
    exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi

# The official image's redis-server is built with protected mode off (a
# container is reached from other containers, not from loopback); Debian's
# is built with it on. Say the official default first, right after the
# config file if there is one, so that the command's own options still win.
if [ "$1" = redis-server ]; then
    shift
    if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
        conf="$1"
        shift
        set -- redis-server "$conf" --protected-mode no "$@"
    else
        set -- redis-server --protected-mode no "$@"
    fi
fi

if [ "$(umask)" = 0022 ]; then
    umask 0077
fi

exec "$@"
