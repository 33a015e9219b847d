#!/bin/sh
# Turns DNSCHAOS_* environment variables into `dnschaos run` flags; any
# arguments given to the container are appended (flags win over the file).
#
#   DNSCHAOS_CONFIG      YAML config file (used when it exists; default
#                        /etc/dnschaos/dnschaos.yaml, mount it there)
#   DNSCHAOS_LISTEN      listen addresses, comma- or space-separated
#   DNSCHAOS_UPSTREAMS   resolvers to forward to, HOST[:PORT], comma- or space-separated
#   DNSCHAOS_ADMIN       admin/metrics listener, HOST:PORT or "off"
#   DNSCHAOS_ALLOW       client networks allowed to query (CIDRs)
#   DNSCHAOS_POLICY      sequential | round_robin | random
#   DNSCHAOS_TIMEOUT / DNSCHAOS_DEADLINE   per-attempt timeout / answer deadline
#   DNSCHAOS_SCENARIO    a scenario file to start when the proxy starts
#   DNSCHAOS_TIME_SCALE  override the scenario's time_scale
#   DNSCHAOS_LOG_LEVEL   debug | info | warning | error
#   DNSCHAOS_COMMAND     the program to run (default: dnschaos)
#   DNSCHAOS_ADMIN_TOKEN read by the proxy itself: bearer token for the admin
#                        API (required when the admin listener is not on loopback)
set -eu

args=""
add() {  # add FLAG "a, b c": one FLAG per value
    flag=$1
    for value in $(printf '%s' "$2" | tr ',' ' '); do
        args="$args $flag $value"
    done
}

if [ -n "${DNSCHAOS_CONFIG:-}" ] && [ -f "$DNSCHAOS_CONFIG" ]; then
    args="$args --config $DNSCHAOS_CONFIG"
fi
[ -n "${DNSCHAOS_LISTEN:-}" ] && add --listen "$DNSCHAOS_LISTEN"
[ -n "${DNSCHAOS_UPSTREAMS:-}" ] && add --upstream "$DNSCHAOS_UPSTREAMS"
[ -n "${DNSCHAOS_ADMIN:-}" ] && add --admin "$DNSCHAOS_ADMIN"
[ -n "${DNSCHAOS_ALLOW:-}" ] && add --allow "$DNSCHAOS_ALLOW"
[ -n "${DNSCHAOS_POLICY:-}" ] && add --policy "$DNSCHAOS_POLICY"
[ -n "${DNSCHAOS_TIMEOUT:-}" ] && add --timeout "$DNSCHAOS_TIMEOUT"
[ -n "${DNSCHAOS_DEADLINE:-}" ] && add --deadline "$DNSCHAOS_DEADLINE"
[ -n "${DNSCHAOS_SCENARIO:-}" ] && add --scenario "$DNSCHAOS_SCENARIO"
[ -n "${DNSCHAOS_TIME_SCALE:-}" ] && add --time-scale "$DNSCHAOS_TIME_SCALE"
[ -n "${DNSCHAOS_LOG_LEVEL:-}" ] && add --log-level "$DNSCHAOS_LOG_LEVEL"

# shellcheck disable=SC2086  # word splitting of $args is intended (values have no spaces)
exec ${DNSCHAOS_COMMAND:-dnschaos} run $args "$@"
