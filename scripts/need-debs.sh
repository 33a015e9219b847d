#!/usr/bin/env bash
# Install Debian packages when any of the given commands or packages is
# missing (a package without a command, such as fonts, is checked by dpkg).
# usage: need-debs.sh "cmd1 cmd2" "pkg1 pkg2"
set -euo pipefail
missing=0
for cmd in $1; do
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing=1
done
for pkg in $2; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing=1
done
[ "$missing" = 0 ] && exit 0
SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "need root (or sudo) to install: $2" >&2; exit 1; }
    SUDO=sudo
fi
echo "installing Debian packages: $2" >&2
$SUDO apt-get update -qq
# The tests start their own instances on free loopback ports, so a packaged
# service that starts on install (on port 53) does not get in their way.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $2 >/dev/null
