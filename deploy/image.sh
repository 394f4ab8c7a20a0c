#!/usr/bin/env bash
# Builds the container image of Berth (one image, every role) on this machine, offline: a root
# file system holding the stripped release binary and the shared libraries ldd names for it,
# imported with `docker import` (no base image is needed, none is pulled). deploy/Dockerfile
# builds the same image where base images can be pulled.
#
#   deploy/image.sh [IMAGE]     IMAGE defaults to berth:latest; prints the image's size
#
# The binary is $BERTH_BIN, or built with cargo (release) from this checkout.
set -euo pipefail
image=${1:-berth:latest}
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=deploy/berth-bin.sh
. "$repo/deploy/berth-bin.sh"
command -v docker >/dev/null || { echo "docker is not installed" >&2; exit 1; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/local/bin" "$root/data" "$root/tmp" "$root/etc"
chmod 1777 "$root/tmp"
cp "$bin" "$root/usr/local/bin/berth"
strip "$root/usr/local/bin/berth"
# The shared libraries the binary loads, and the loader, at the paths ldd gives.
ldd "$bin" | awk '/=> \//{print $3} /^[ \t]*\/[^ ]*ld-linux/{print $1}' | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# Name resolution and the users a process may look up (root only).
printf 'root:x:0:0:root:/:/usr/local/bin/berth\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"

tar -C "$root" -c . | docker import \
  --change 'ENTRYPOINT ["/usr/local/bin/berth"]' \
  --change 'CMD ["standalone", "--listen", "0.0.0.0:5000", "--data-dir", "/data"]' \
  --change 'EXPOSE 5000' \
  --change 'VOLUME ["/data"]' \
  - "$image" >/dev/null
size=$(docker image inspect --format '{{.Size}}' "$image")
echo "$image: $((size / 1000000)) MB ($size bytes)"
