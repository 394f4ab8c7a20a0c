"""oras (PyPI) against Berth: push and pull an artifact, attach one to it through `subject`,
and find it through the referrers API. Exits non-zero on any mismatch.

Usage: oras_roundtrip.py HOST:PORT WORKDIR USER TOKEN
"""
import hashlib
import json
import os
import sys

import oras.client
import oras.oci
import requests

host, work, user, token = sys.argv[1:5]
os.chdir(work)
repo = f"{host}/acme/artifacts"
# oras-py 0.2's token backend re-sends its cached registry token after a 401 and fetches a new
# one only after a 403, while the Docker token protocol (which docker, podman, skopeo and the
# OCI conformance suite follow) answers a token that lacks a scope with 401 and
# `insufficient_scope`. So oras sends its credentials with Basic, which Berth takes on every
# request; the token flow is tested with the other clients.
client = oras.client.OrasClient(hostname=host, insecure=True, auth_backend="basic")
client.login(username=user, password=token, hostname=host, tls_verify=False)
http = requests.Session()
http.auth = (user, token)

# An artifact whose config media type makes its artifactType.
with open("model.bin", "wb") as f:
    f.write(os.urandom(300_000))
with open("config.json", "w") as f:
    f.write("{}")
r = client.push(
    target=f"{repo}:v1",
    files=["model.bin"],
    manifest_config="config.json:application/vnd.example.model.config.v1+json",
    manifest_annotations={"org.opencontainers.image.description": "a test artifact"},
    disable_path_validation=True,
)
assert r.status_code == 201, r.text
subject_digest = r.headers["Docker-Content-Digest"]

os.makedirs("out", exist_ok=True)
pulled = client.pull(target=f"{repo}:v1", outdir="out")
assert any(p.endswith("model.bin") for p in pulled), pulled
with open("model.bin", "rb") as a, open(os.path.join("out", "model.bin"), "rb") as b:
    assert a.read() == b.read(), "pulled artifact differs"

# Attach an SBOM to it through `subject`, with a chunked upload.
manifest = client.get_manifest(f"{repo}:v1")
subject = oras.oci.Subject.from_manifest(manifest)
assert subject.digest == subject_digest, (subject.digest, subject_digest)
with open("sbom.json", "w") as f:
    json.dump({"spdxVersion": "SPDX-2.3", "name": "test"}, f)
r = client.push(
    target=f"{repo}:sbom",
    files=["sbom.json"],
    manifest_config="config.json:application/spdx+json",
    subject=subject,
    do_chunked=True,
    chunk_size=64,
    disable_path_validation=True,
)
assert r.status_code == 201, r.text
assert r.headers.get("OCI-Subject") == subject_digest, r.headers

# A signature with an explicit artifactType, by plain HTTP (oras-py has no option for it).
base = f"http://{host}/v2/acme/artifacts"
empty = b"{}"
empty_digest = "sha256:" + hashlib.sha256(empty).hexdigest()
http.post(f"{base}/blobs/uploads/?digest={empty_digest}", data=empty).raise_for_status()
sig = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "artifactType": "application/vnd.example.signature",
    "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty_digest, "size": 2},
    "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty_digest, "size": 2}],
    "subject": {"mediaType": subject.mediaType, "digest": subject.digest, "size": subject.size},
}
body = json.dumps(sig).encode()
sig_digest = "sha256:" + hashlib.sha256(body).hexdigest()
r = http.put(
    f"{base}/manifests/{sig_digest}",
    data=body,
    headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
)
assert r.status_code == 201, r.text

r = http.get(f"{base}/referrers/{subject_digest}")
r.raise_for_status()
types = sorted(m.get("artifactType") for m in r.json()["manifests"])
assert types == ["application/spdx+json", "application/vnd.example.signature"], types
r = http.get(f"{base}/referrers/{subject_digest}", params={"artifactType": "application/vnd.example.signature"})
assert r.headers.get("OCI-Filters-Applied") == "artifactType", r.headers
assert [m["digest"] for m in r.json()["manifests"]] == [sig_digest], r.json()

tags = client.get_tags(repo)
assert sorted(tags) == ["sbom", "v1"], tags
print("oras round trip ok")
