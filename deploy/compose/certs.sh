#!/usr/bin/env bash
# Makes the certificates deploy/compose/tls.yml mounts into the compose cluster's containers:
#
#   deploy/compose/certs.sh DIR [NAME...]
#
#   DIR/ca.crt            the authority every role and every client trusts
#   DIR/ca.key            its key: keep it out of the containers (tls.yml does not mount it)
#   DIR/https/tls.crt     the frontends' HTTPS certificate, for localhost, 127.0.0.1, ::1,
#   DIR/https/tls.key       frontend1, frontend2 and each NAME (a host name or an IP address)
#   DIR/cluster/tls.crt   what every role presents to every other over mutual TLS, valid for
#   DIR/cluster/tls.key     the names the roles call each other by (meta1..3, storage1..3),
#   DIR/cluster/ca.crt      and the authority, again, beside them
#
# (the names Kubernetes gives a TLS secret's keys).
# ECDSA P-256, valid for DAYS days (default 365). An existing authority in DIR is kept, so that
# running it again renews the two certificates under the same trust; the frontends take a
# renewed HTTPS certificate within seconds, the other roles at their next restart.
set -euo pipefail

[ $# -ge 1 ] || { sed -n '2,14p' "$0" >&2; exit 2; }
dir=$1; shift
days=${DAYS:-365}
command -v openssl >/dev/null || { echo "certs.sh needs openssl" >&2; exit 1; }
mkdir -p "$dir"
umask 077

san_of() { # NAME -> DNS:NAME or IP:NAME
  if [[ $1 =~ ^[0-9.]+$ || $1 == *:* ]]; then echo "IP:$1"; else echo "DNS:$1"; fi
}

if [ ! -s "$dir/ca.crt" ] || [ ! -s "$dir/ca.key" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$((days * 3))" \
    -subj "/CN=berth compose CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
fi

issue() { # SUBDIR SAN...
  local name=$1; shift
  local sans=() tmp
  for n in "$@"; do sans+=("$(san_of "$n")"); done
  tmp=$(mktemp -d)
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=berth $name" \
    -keyout "$tmp/key" -out "$tmp/csr" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' \
    "$(IFS=,; echo "${sans[*]}")" >"$tmp/ext"
  openssl x509 -req -in "$tmp/csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days "$days" -extfile "$tmp/ext" -out "$tmp/crt" 2>/dev/null
  # Key first, then certificate, each replaced whole: a frontend reading them meanwhile sees a
  # pair that does not match, skips it and takes the next.
  mkdir -p "$dir/$name"
  mv "$tmp/key" "$dir/$name/tls.key"
  mv "$tmp/crt" "$dir/$name/tls.crt"
  rm -rf "$tmp"
}

issue https localhost 127.0.0.1 ::1 frontend1 frontend2 "$@"
issue cluster meta1 meta2 meta3 storage1 storage2 storage3 frontend1 frontend2
# The certificates are public; the keys stay readable by their owner alone (the containers
# run as root).
cp "$dir/ca.crt" "$dir/cluster/ca.crt"
chmod 755 "$dir/https" "$dir/cluster"
chmod 644 "$dir/ca.crt" "$dir/cluster/ca.crt" "$dir/https/tls.crt" "$dir/cluster/tls.crt"
rm -f "$dir/ca.srl"
echo "certificates in $dir: trust $dir/ca.crt"
