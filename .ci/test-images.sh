#!/usr/bin/env bash
# Builds, offline from Debian's packages, the images soul's tests run. No registry is involved:
# each rootfs comes from debootstrap and is loaded with `docker import`. Rootfs tarballs are
# cached in $SOUL_CI_CACHE (default /var/cache/soul-ci) and rebuilt from nothing when absent.
#   soul-test/nginx:1  a real nginx (with curl for its health check): the test app
#   soul-test/tor:1    tor, for the Tor transport
#   soul-test/nebula:1 nebula (and curl), for the Nebula transport and its test peers
#   soul-test/tailscale-standin:3
#                      a STAND-IN for tailscale/tailscale: no tailnet can be reached here, so
#                      it answers `tailscale status --json` like the real CLI does, and its
#                      entrypoint checks what containerboot checks at start and exits as it
#                      does (.ci/tailscale-standin/containerboot)
set -euo pipefail
cache=${SOUL_CI_CACHE:-/var/cache/soul-ci}
mkdir -p "$cache"

# The Debian mirror this machine's apt already uses (deb822 .sources first, then the one-line
# sources.list); SOUL_DEBIAN_MIRROR overrides. Empty when none is configured: debootstrap then
# uses its own default.
debian_mirror() {
  local f uri=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    uri=$(awk 'BEGIN{RS=""} /Suites:[^\n]*bookworm([ \n]|$)/ && !/security/ { if (match($0, /URIs:[ \t]*[^ \t\n]+/)) { u=substr($0, RSTART, RLENGTH); sub(/URIs:[ \t]*/, "", u); print u; exit } }' "$f")
    [ -n "$uri" ] && break
  done
  if [ -z "$uri" ] && [ -r /etc/apt/sources.list ]; then
    uri=$(awk '$1 == "deb" && / bookworm / && !/security/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' /etc/apt/sources.list)
  fi
  printf '%s' "$uri"
}
mirror=${SOUL_DEBIAN_MIRROR:-$(debian_mirror)}

# rootfs NAME PACKAGES SETUP: debootstrap a minbase bookworm with PACKAGES into the cache,
# run SETUP (a function) on it, and leave it as $cache/NAME-rootfs.tar.
rootfs() {
  local name=$1 packages=$2 setup=$3
  local tarball="$cache/$name-rootfs.tar"
  [ -s "$tarball" ] && return 0
  command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
  local root
  root=$(mktemp -d "$cache/rootfs.XXXXXX")
  echo "debootstrap: bookworm minbase with $packages (about a minute, once)"
  if ! debootstrap --variant=minbase --include="$packages" bookworm "$root" ${mirror:+"$mirror"} >"$cache/$name-debootstrap.log" 2>&1; then
    tail -20 "$cache/$name-debootstrap.log"
    rm -rf "$root"
    return 1
  fi
  rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
  "$setup" "$root"
  tar -C "$root" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  rm -rf "$root"
}

nginx_setup() {
  # nginx logs to the container's stdout/stderr, and answers on port 80.
  ln -sf /dev/stdout "$1/var/log/nginx/access.log"
  ln -sf /dev/stderr "$1/var/log/nginx/error.log"
  echo "served by nginx in a soul pod" > "$1/var/www/html/index.html"
}

nebula_setup() {
  mkdir -p "$1/etc/nebula"
}

tor_setup() {
  # soul mounts its own torrc; the package's default one would start a SOCKS port.
  rm -f "$1/etc/tor/torrc"
}

# image NAME TAG PACKAGES SETUP CHANGES…
image() {
  local name=$1 tag=$2 packages=$3 setup=$4
  shift 4
  if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "test image $tag is present"
    return 0
  fi
  rootfs "$name" "$packages" "$setup"
  local changes=()
  for c in "$@"; do changes+=(--change "$c"); done
  docker import "${changes[@]}" "$cache/$name-rootfs.tar" "$tag" >/dev/null
  echo "built test image $tag"
}

image nginx soul-test/nginx:1 nginx-light,curl nginx_setup 'CMD ["nginx", "-g", "daemon off;"]' 'EXPOSE 80'
image tor soul-test/tor:1 tor tor_setup 'CMD ["tor", "-f", "/etc/soul/torrc"]'
image nebula soul-test/nebula:1 nebula,curl,iproute2 nebula_setup 'CMD ["nebula", "-config", "/etc/nebula/config.yml"]'

standin=soul-test/tailscale-standin:3
if docker image inspect "$standin" >/dev/null 2>&1; then
  echo "test image $standin is present"
else
  context=$(mktemp -d)
  cp "$(dirname "$0")/tailscale-standin/containerboot" "$context/containerboot"
  cat > "$context/Dockerfile" <<'DOCKERFILE'
FROM soul-test/nginx:1
COPY containerboot /usr/local/bin/containerboot
RUN printf '%s\n' '#!/bin/sh' \
  'if [ "$1" = status ] && [ "$2" = --json ]; then' \
  '  if [ -z "$TS_AUTHKEY" ]; then printf "{\"BackendState\":\"NeedsLogin\",\"Self\":{\"HostName\":\"%s\"}}\n" "$TS_HOSTNAME"; exit 0; fi' \
  '  printf "{\"BackendState\":\"Running\",\"Self\":{\"HostName\":\"%s\",\"TailscaleIPs\":[\"100.101.102.103\",\"fd7a:115c:a1e0::1\"]}}\n" "$TS_HOSTNAME"' \
  '  exit 0' \
  'fi' \
  'echo "stand-in tailscale: only status --json" >&2; exit 1' > /usr/local/bin/tailscale \
 && chmod 755 /usr/local/bin/tailscale /usr/local/bin/containerboot
CMD ["/usr/local/bin/containerboot"]
DOCKERFILE
  docker build -q -t "$standin" "$context" >/dev/null
  rm -rf "$context"
  echo "built test image $standin (a stand-in for tailscale/tailscale)"
fi
