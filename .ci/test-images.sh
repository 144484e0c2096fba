#!/usr/bin/env bash
# Builds, offline from Debian's packages, the images soul's tests run: a real nginx (with curl
# for its health check) as `soul-test/nginx:1`. No registry is involved: the rootfs comes
# from debootstrap and is loaded with `docker import`. The rootfs tarball is cached in
# $SOUL_CI_CACHE (default /var/cache/soul-ci) and rebuilt from nothing when absent.
set -euo pipefail
cache=${SOUL_CI_CACHE:-/var/cache/soul-ci}
mirror=${SOUL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
image=soul-test/nginx:1
mkdir -p "$cache"

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "test image $image is present"
  exit 0
fi

tarball="$cache/nginx-rootfs.tar"
if [ ! -s "$tarball" ]; then
  command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
  root=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  echo "debootstrap: bookworm minbase with nginx-light and curl (a few minutes, once)"
  debootstrap --variant=minbase --include=nginx-light,curl bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log"; exit 1; }
  # Keep the image small: no apt lists, docs or caches.
  rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
  # nginx logs to the container's stdout/stderr, and answers on port 80.
  ln -sf /dev/stdout "$root/var/log/nginx/access.log"
  ln -sf /dev/stderr "$root/var/log/nginx/error.log"
  echo "served by nginx in a soul pod" > "$root/var/www/html/index.html"
  tar -C "$root" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi
docker import \
  --change 'CMD ["nginx", "-g", "daemon off;"]' \
  --change 'EXPOSE 80' \
  "$tarball" "$image" >/dev/null
echo "built test image $image"
