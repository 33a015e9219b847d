#!/bin/sh
# Runs `dnschaos run` with the arguments given to the container.  The proxy
# reads its DNSCHAOS_* environment variables itself, and only those that are
# set: each overrides the config file's value, flags override both (README
# "Options").
#
#   DNSCHAOS_CONFIG        YAML config file (the image's ENV: /etc/dnschaos/dnschaos.yaml,
#                          whose default is docker/defaults.yaml; mount yours there)
#   DNSCHAOS_LISTEN        listen addresses, comma- or space-separated
#   DNSCHAOS_UPSTREAMS     resolvers to forward to, HOST[:PORT], comma- or space-separated
#   DNSCHAOS_ADMIN_LISTEN  the admin/metrics listener, HOST:PORT or "off"
#   DNSCHAOS_ALLOW         client networks allowed to query (CIDRs)
#   DNSCHAOS_POLICY        sequential | round_robin | random
#   DNSCHAOS_TIMEOUT / DNSCHAOS_DEADLINE   per-attempt timeout / answer deadline
#   DNSCHAOS_SCENARIO      a scenario file to start when the proxy starts
#   DNSCHAOS_TIME_SCALE    override the scenario's time_scale
#   DNSCHAOS_LOG_LEVEL     debug | info | warning | error
#   DNSCHAOS_ADMIN_TOKEN   bearer token for the admin API (required when the
#                          admin listener is not on loopback)
#   DNSCHAOS_COMMAND       the program to run (default: dnschaos)
set -eu

if [ -n "${DNSCHAOS_ADMIN:-}" ] && [ -z "${DNSCHAOS_ADMIN_LISTEN:-}" ]; then
    echo "dnschaos-entrypoint: DNSCHAOS_ADMIN is ignored: the admin listen address is" \
         "DNSCHAOS_ADMIN_LISTEN (DNSCHAOS_API is the client commands' URL)" >&2
fi
exec "${DNSCHAOS_COMMAND:-dnschaos}" run "$@"
