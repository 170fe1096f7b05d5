#!/usr/bin/env bash
# Install Debian's nginx (nginx-light) when missing: the load balancer of the two-replica test and of
# deploy/nginx.conf. Needs root (or password-less sudo); the package's service is never started.
set -euo pipefail
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    run=()
elif sudo -n true 2>/dev/null; then
    run=(sudo -n)
else
    echo "nginx is missing and installing it needs root: apt-get install nginx-light" >&2
    exit 1
fi
# Debian starts a newly installed service (nginx on port 80) unless policy-rc.d says no: say no, then clean up.
policy=/usr/sbin/policy-rc.d
added=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${run[@]}" tee "$policy" >/dev/null
    "${run[@]}" chmod 755 "$policy"
    added=1
fi
trap '[ -n "$added" ] && "${run[@]}" rm -f "$policy"' EXIT
"${run[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${run[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null
echo "installed $(/usr/sbin/nginx -v 2>&1)"
