#!/bin/sh
# Ray's HAProxy with its statistics page and Prometheus exporter on 127.0.0.1 only.
#
# Ray's template binds both on every interface and has no setting for the address. Ray starts
# and reloads HAProxy as `BINARY -db -f CONFIG [-sf PIDS]` (RAY_SERVE_HAPROXY_BINARY_PATH names
# this script), so each time this rewrites the bind lines of those two ports in CONFIG, under the
# lock Ray writes CONFIG under, then becomes the real binary with the same arguments (Ray finds
# its HAProxy processes by CONFIG in their command line). tests/test_serve_haproxy.py checks
# that the running HAProxy listens on nothing but loopback, so a change of Ray's template shows.
#
# Environment (set by serve.launch.use_haproxy, inherited through Ray):
#   CARCLF_HAPROXY_BINARY            the real HAProxy
#   RAY_SERVE_HAPROXY_STATS_PORT     the statistics port
#   RAY_SERVE_HAPROXY_METRICS_PORT   the Prometheus exporter's port
set -eu

config=""
previous=""
for arg in "$@"; do
    if [ "$previous" = "-f" ]; then config=$arg; fi
    previous=$arg
done

if [ -n "$config" ]; then
    ports="${RAY_SERVE_HAPROXY_STATS_PORT}|${RAY_SERVE_HAPROXY_METRICS_PORT}"
    # `bind :P`, `bind *:P`, `bind 0.0.0.0:P`, `bind [::]:P` ... -> `bind 127.0.0.1:P`.
    flock "$config.lock" sed -i -E \
        "s/^([[:space:]]*bind[[:space:]]+)[^[:space:]]*:(${ports})([[:space:]]|\$)/\\1127.0.0.1:\\2\\3/" \
        "$config"
fi
exec "$CARCLF_HAPROXY_BINARY" "$@"
