#!/bin/sh
# Ray's HAProxy with carclf's changes to Ray's config: side ports on loopback, admission control.
#
# Ray starts and reloads HAProxy as `BINARY -db -f CONFIG [-sf PIDS]`, RAY_SERVE_HAPROXY_BINARY_PATH
# naming this script. Each time, under the lock Ray writes CONFIG under, this edits CONFIG in
# place (Ray finds its HAProxy processes by CONFIG in their command line), then becomes the real
# binary with the same arguments. tests/test_serve_front.py checks the edits on a config and on
# the running HAProxy, so a change of Ray's template shows there.
#
# 1. The statistics page and Prometheus exporter, which Ray's template binds on every interface
#    with no setting for the address, listen on 127.0.0.1 only.
# 2. With CARCLF_FRONT_MAX_INFLIGHT set, HAProxy admits requests as the ingress would, at a
#    fraction of the cost (docs/ARCHITECTURE.md, "The HTTP front"):
#    - a POST waits in HAProxy until its body is in (or HAProxy's buffer is full), so a slow
#      upload holds an HAProxy connection, not an ingress slot; past the body timeout, a 408;
#    - a POST that declares a body over the size limit is a 413 at once, connection closed;
#    - past MAX_INFLIGHT POSTs per ingress replica that is up, a JSON 503 with Retry-After, sent
#      by HAProxy in well under a millisecond: the ingress never spends its CPU on refusals;
#    - a request whose headers take longer than the body timeout is a 408 too (Ray leaves
#      `timeout http-request` to `timeout client`, an hour: a slowloris would hold HAProxy's
#      connections that long);
#    - HAProxy's own 503 (no replica up) and 408 are JSON too, instead of Ray's 500 page.
#    GETs (health, readiness, metadata, the page) are never refused here.
# 3. HAProxy dies with the Ray process that started it (PR_SET_PDEATHSIG, SIGKILL): when the
#    driver of a local Ray is killed, Ray's processes go and HAProxy would otherwise stay,
#    re-parented to PID 1 and holding the port. A signal the kernel sends, not cleanup code
#    that a SIGKILL skips. The parent is checked after the call: had it died in between, no
#    signal would ever come.
#
# Environment (set by serve.front.use_front, inherited through Ray):
#   CARCLF_HAPROXY_BINARY            the real HAProxy
#   CARCLF_PYTHON                    the Python that sets the parent-death signal (Linux)
#   RAY_SERVE_HAPROXY_STATS_PORT     the statistics port
#   RAY_SERVE_HAPROXY_METRICS_PORT   the Prometheus exporter's port
#   CARCLF_FRONT_MAX_INFLIGHT        POSTs at once per ingress replica (unset: no admission)
#   CARCLF_FRONT_BODY_TIMEOUT_MS     time to receive a request body
#   CARCLF_FRONT_MAX_BODY_BYTES      the largest body a request may declare
#   CARCLF_FRONT_RETRY_AFTER_S       the Retry-After of every 503
set -eu

config=""
previous=""
for arg in "$@"; do
    if [ "$previous" = "-f" ]; then config=$arg; fi
    previous=$arg
done

if [ -n "$config" ]; then
    exec 9>"$config.lock" # Ray's lock on CONFIG, held while both edits run
    flock 9
    ports="${RAY_SERVE_HAPROXY_STATS_PORT}|${RAY_SERVE_HAPROXY_METRICS_PORT}"
    # `bind :P`, `bind *:P`, `bind 0.0.0.0:P`, `bind [::]:P` ... -> `bind 127.0.0.1:P`.
    sed -i -E \
        "s/^([[:space:]]*bind[[:space:]]+)[^[:space:]]*:(${ports})([[:space:]]|\$)/\\1127.0.0.1:\\2\\3/" \
        "$config"
    if [ -n "${CARCLF_FRONT_MAX_INFLIGHT:-}" ] && ! grep -q "carclf admission" "$config"; then
        inflight=$CARCLF_FRONT_MAX_INFLIGHT
        body_ms=$CARCLF_FRONT_BODY_TIMEOUT_MS
        max_body=$CARCLF_FRONT_MAX_BODY_BYTES
        json="content-type application/json"
        retry="$json hdr retry-after $CARCLF_FRONT_RETRY_AFTER_S"
        # Ray's `errorfile 503` turns HAProxy's own 503 into a 500 page; a JSON 503 replaces
        # it. In the defaults: first, so a setting of Ray's own there wins. In the HTTP front:
        # before Ray's rules, so a request is admitted before it is routed. In each app backend
        # (the sections with Ray's `default-server` line): its POSTs against MAX_INFLIGHT per
        # server up.
        sed -i -E \
            -e "/^[[:space:]]*errorfile 503 /d" \
            -e "/^defaults/a\\
    # carclf admission (haproxy-front.sh)\\
    timeout http-request ${body_ms}ms\\
    http-error status 503 $retry string '{\"error\": \"no replica can take the request; retry shortly\"}'\\
    http-error status 408 $json hdr connection close string '{\"error\": \"request not received within $body_ms ms\"}'" \
            -e "/^frontend http_frontend/a\\
    http-request return status 413 $json hdr connection close string '{\"error\": \"request body over $max_body bytes\"}' if METH_POST { req.hdr_val(content-length) gt $max_body }\\
    http-request wait-for-body time ${body_ms}ms if METH_POST" \
            -e "/^[[:space:]]*default-server /a\\
    http-request set-var(txn.carclf_slots) nbsrv,mul($inflight)\\
    http-request set-var(txn.carclf_busy) bool(1) if METH_POST { be_conn,sub(txn.carclf_slots) gt 0 }\\
    http-request set-log-level silent if { var(txn.carclf_busy) -m bool }\\
    http-request return status 503 $retry string '{\"error\": \"the server is busy; retry shortly\"}' if { var(txn.carclf_busy) -m bool }" \
            "$config"
    fi
    exec 9>&- # released: HAProxy must not inherit it, or Ray's next reload would wait on it
fi
# PR_SET_PDEATHSIG is 1, SIGKILL 9; both survive the exec into HAProxy.
exec "${CARCLF_PYTHON:-python3}" -c '
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0) != 0:
    sys.exit("haproxy-front.sh: prctl(PR_SET_PDEATHSIG) failed: " + os.strerror(ctypes.get_errno()))
if os.getppid() != int(sys.argv[1]):
    sys.exit("haproxy-front.sh: the Ray process that started HAProxy is gone")
os.execv(sys.argv[2], sys.argv[2:])
' "$PPID" "$CARCLF_HAPROXY_BINARY" "$@"
