#!/usr/bin/env bash
# Makes the certificates deploy/compose/tls.yml mounts into the compose cluster's containers:
#
#   deploy/compose/certs.sh DIR [NAME...]
#
#   DIR/ca.crt            the authority of the frontends' HTTPS certificate: what clients trust
#   DIR/https/tls.crt     the frontends' certificate (server only), for localhost, 127.0.0.1,
#   DIR/https/tls.key       ::1, frontend1, frontend2 and each NAME (host name or IP address)
#   DIR/cluster/ca.crt    a second authority, of the roles alone: each role presents
#   DIR/cluster/tls.crt     DIR/cluster/tls.crt to every other and takes only certificates of
#   DIR/cluster/tls.key     this authority; valid for the names the roles call each other by
#   DIR/*.key             the two authorities' keys: they stay out of the containers
#   DIR/names             the NAMEs given, used again when the script runs without any
#
# (tls.crt, tls.key and ca.crt are the names Kubernetes gives a TLS secret's keys.) Two
# authorities, so that the HTTPS key, the one most often copied to a proxy or balancer, opens
# nothing inside the cluster. ECDSA P-256; certificates valid for DAYS days (default 365), the
# authorities three times as long. Running it again keeps the authorities and renews both
# certificates: the frontends serve the new one within seconds, the other roles after their next
# restart.
set -euo pipefail

[ $# -ge 1 ] || { sed -n '2,21p' "$0" >&2; exit 2; }
dir=$1; shift
days=${DAYS:-365}
command -v openssl >/dev/null || { echo "certs.sh needs openssl" >&2; exit 1; }
mkdir -p "$dir"
umask 077

names=("$@")
if [ ${#names[@]} -eq 0 ] && [ -s "$dir/names" ]; then
  mapfile -t names <"$dir/names"
fi
sans_of() { # NAME... -> DNS:a,IP:b,...
  local out=() n
  for n in "$@"; do
    if [[ $n =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || $n =~ ^[0-9A-Fa-f:]+:[0-9A-Fa-f:.]*$ ]]; then
      out+=("IP:$n")
    elif [[ $n =~ ^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then
      out+=("DNS:$n")
    else
      echo "certs.sh: '$n' is neither a host name nor an IP address" >&2; exit 2
    fi
  done
  (IFS=,; echo "${out[*]}")
}
# Checked before anything is written.
https_sans=$(sans_of localhost 127.0.0.1 ::1 frontend1 frontend2 ${names[@]+"${names[@]}"})
cluster_sans=$(sans_of meta1 meta2 meta3 storage1 storage2 storage3 frontend1 frontend2)

# Work files next to the results, so that each result is renamed into place whole, and removed
# whatever happens (they include private keys).
tmp=$(mktemp -d "$dir/.new.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
ssl() { # openssl ARGS..., its messages shown only when it fails
  openssl "$@" 2>"$tmp/err" || { cat "$tmp/err" >&2; exit 1; }
}

authority() { # CERT KEY NAME
  if [ -s "$1" ] && [ -s "$2" ]; then
    if ! openssl x509 -in "$1" -noout -checkend $((days * 86400)) >/dev/null; then
      echo "certs.sh: the authority $1 expires within $days days; move it and its key away to make a new one" >&2
      echo "  (every client and role must then be given the new $1)" >&2
      exit 1
    fi
    return
  fi
  if [ -e "$1" ] || [ -e "$2" ]; then
    echo "certs.sh: $1 or $2 is missing or empty while the other is there; refusing to make a new authority" >&2
    exit 1
  fi
  ssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$((days * 3))" \
    -subj "/CN=$3" -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$tmp/ca.key" -out "$tmp/ca.crt"
  mv "$tmp/ca.key" "$2"
  mv "$tmp/ca.crt" "$1"
}

issue() { # SUBDIR CA-CERT CA-KEY EXTENDED-KEY-USAGE SANS
  local sub=$1 ca=$2 cakey=$3 usage=$4 sans=$5
  ssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=berth $sub" \
    -keyout "$tmp/key" -out "$tmp/csr"
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\nsubjectAltName=%s\n' \
    "$usage" "$sans" >"$tmp/ext"
  ssl x509 -req -in "$tmp/csr" -CA "$ca" -CAkey "$cakey" -set_serial "0x$(openssl rand -hex 16)" \
    -days "$days" -extfile "$tmp/ext" -out "$tmp/crt"
  mkdir -p "$dir/$sub"
  chmod 755 "$dir/$sub"
  chmod 644 "$tmp/crt"
  # Key first, then certificate, each renamed into place whole: a frontend reading them in
  # between sees a pair that does not match, skips it and takes the next.
  mv "$tmp/key" "$dir/$sub/tls.key"
  mv "$tmp/crt" "$dir/$sub/tls.crt"
}

authority "$dir/ca.crt" "$dir/ca.key" "berth compose HTTPS CA"
authority "$dir/cluster-ca.crt" "$dir/cluster-ca.key" "berth compose cluster CA"
issue https "$dir/ca.crt" "$dir/ca.key" serverAuth "$https_sans"
issue cluster "$dir/cluster-ca.crt" "$dir/cluster-ca.key" serverAuth,clientAuth "$cluster_sans"
cp "$dir/cluster-ca.crt" "$tmp/cluster-ca" && chmod 644 "$tmp/cluster-ca" && mv "$tmp/cluster-ca" "$dir/cluster/ca.crt"
chmod 644 "$dir/ca.crt" "$dir/cluster-ca.crt"
for n in ${names[@]+"${names[@]}"}; do echo "$n"; done >"$dir/names"
echo "certificates in $dir: clients trust $dir/ca.crt"
