//! Manifest parsing and validation: what a manifest refers to, and whether it is acceptable.
//!
//! OCI image manifests and indexes and Docker schema 2 manifests and manifest lists are
//! parsed (with `oci-spec`'s types, which the Docker formats share) to learn the blobs and
//! child manifests they need, their `subject`, `artifactType` and annotations. Those four
//! are the manifest types; artifacts are image manifests with an `artifactType` (OCI 1.1).
//! Any other media type is refused.

use std::collections::BTreeMap;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use serde::Deserialize;

use crate::error::{ErrorCode, RegistryError, Result};
use crate::Digest;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The empty descriptor's media type that artifacts use as config.
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";

/// Largest manifest accepted: the distribution spec lets registries refuse above 4 MiB, and
/// every client keeps manifests far smaller.
pub const MAX_MANIFEST_SIZE: usize = 4 * 1024 * 1024;

/// Media types of layers that are never uploaded to a registry (foreign / non-distributable).
const NON_DISTRIBUTABLE_PREFIXES: [&str; 2] =
    ["application/vnd.oci.image.layer.nondistributable.", "application/vnd.docker.image.rootfs.foreign."];

/// What a manifest needs from, and tells, the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedManifest {
    /// The media type it is stored and served with.
    pub media_type: String,
    /// Blobs that must be linked in the repository (config and distributable layers).
    pub blobs: Vec<Digest>,
    /// The config blob of an image manifest.
    pub config: Option<Digest>,
    /// Child manifests that must exist in the repository (of an index).
    pub manifests: Vec<Digest>,
    /// `subject`, if present.
    pub subject: Option<Digest>,
    /// `artifactType`, or for an image manifest without one, its config's media type.
    pub artifact_type: Option<String>,
    /// The manifest's annotations.
    pub annotations: BTreeMap<String, String>,
}

fn invalid(detail: impl Into<String>) -> RegistryError {
    RegistryError::new(ErrorCode::ManifestInvalid, detail)
}

/// The media type part of a `Content-Type` value, without parameters.
pub fn bare_media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

/// Whether a manifest of this media type is an index (refers to other manifests).
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<serde_json::Value>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<serde_json::Value>,
    config: Option<serde_json::Value>,
}

/// Parses and validates a manifest body pushed with `content_type` (may be absent).
pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<ParsedManifest> {
    if body.len() > MAX_MANIFEST_SIZE {
        return Err(invalid("manifest exceeds 4 MiB").with_status(413));
    }
    let probe: Probe = serde_json::from_slice(body).map_err(|e| invalid(format!("not a JSON manifest: {e}")))?;
    let header = content_type.map(bare_media_type).filter(|t| !t.is_empty());
    let media_type = match (&probe.media_type, header) {
        (Some(body_type), Some(h)) if body_type != h => {
            return Err(invalid(format!("mediaType {body_type} does not match Content-Type {h}")));
        }
        (Some(body_type), _) => body_type.clone(),
        (None, Some(h)) => h.to_string(),
        (None, None) if probe.manifests.is_some() => OCI_INDEX.to_string(),
        (None, None) if probe.config.is_some() => OCI_MANIFEST.to_string(),
        (None, None) => return Err(invalid("no media type in body or Content-Type")),
    };
    match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => {
            check_schema_version(&probe)?;
            let m: ImageManifest = serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
            parse_image(media_type, &m)
        }
        OCI_INDEX | DOCKER_LIST => {
            check_schema_version(&probe)?;
            let i: ImageIndex = serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
            parse_index(media_type, &i)
        }
        // Anything else would be stored and served back with the type the pusher chose: a
        // `text/html` "manifest" on the registry's origin is stored cross-site scripting.
        other => Err(invalid(format!(
            "manifest media type {other:?} is not supported; use an OCI or Docker image manifest or index"
        ))),
    }
}

fn check_schema_version(p: &Probe) -> Result<()> {
    match &p.schema_version {
        Some(v) if v.as_u64() == Some(2) => Ok(()),
        _ => Err(invalid("schemaVersion must be 2")),
    }
}

fn descriptor_digest(d: &Descriptor) -> Result<Digest> {
    d.digest().to_string().parse().map_err(|_| invalid(format!("descriptor digest {} is not supported", d.digest())))
}

fn is_foreign(d: &Descriptor) -> bool {
    let mt = d.media_type().to_string();
    d.urls().as_ref().is_some_and(|u| !u.is_empty()) || NON_DISTRIBUTABLE_PREFIXES.iter().any(|p| mt.starts_with(p))
}

fn annotations(a: &Option<std::collections::HashMap<String, String>>) -> BTreeMap<String, String> {
    a.as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default()
}

fn parse_image(media_type: String, m: &ImageManifest) -> Result<ParsedManifest> {
    let config = descriptor_digest(m.config())?;
    let mut blobs = vec![config.clone()];
    for layer in m.layers() {
        let d = descriptor_digest(layer)?;
        if !is_foreign(layer) {
            blobs.push(d);
        }
    }
    blobs.sort();
    blobs.dedup();
    let artifact_type =
        m.artifact_type().as_ref().map(|t| t.to_string()).or_else(|| Some(m.config().media_type().to_string()));
    Ok(ParsedManifest {
        media_type,
        blobs,
        config: Some(config),
        manifests: vec![],
        subject: m.subject().as_ref().map(descriptor_digest).transpose()?,
        artifact_type,
        annotations: annotations(m.annotations()),
    })
}

fn parse_index(media_type: String, i: &ImageIndex) -> Result<ParsedManifest> {
    let mut manifests = i.manifests().iter().map(descriptor_digest).collect::<Result<Vec<_>>>()?;
    manifests.sort();
    manifests.dedup();
    Ok(ParsedManifest {
        media_type,
        blobs: vec![],
        config: None,
        manifests,
        subject: i.subject().as_ref().map(descriptor_digest).transpose()?,
        artifact_type: i.artifact_type().as_ref().map(|t| t.to_string()),
        annotations: annotations(i.annotations()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
    const L1: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn image(extra: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{CFG}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{L1}","size":0}}]{extra}}}"#
        )
    }

    #[test]
    fn image_manifest_references() {
        let p = parse(Some(OCI_MANIFEST), image("").as_bytes()).unwrap();
        assert_eq!(p.media_type, OCI_MANIFEST);
        assert_eq!(p.blobs.len(), 2);
        assert_eq!(p.artifact_type.as_deref(), Some("application/vnd.oci.image.config.v1+json"));
        assert!(p.subject.is_none());
    }

    #[test]
    fn subject_and_artifact_type() {
        let body = image(&format!(
            r#","artifactType":"application/x-sbom","subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{L1}","size":1}},"annotations":{{"a":"b"}}"#
        ));
        let p = parse(None, body.as_bytes()).unwrap();
        assert_eq!(p.subject, Some(L1.parse().unwrap()));
        assert_eq!(p.artifact_type.as_deref(), Some("application/x-sbom"));
        assert_eq!(p.annotations.get("a").map(String::as_str), Some("b"));
    }

    #[test]
    fn foreign_layers_are_not_required() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{CFG}","size":2}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{L1}","size":5,"urls":["https://example.invalid/l"]}}]}}"#
        );
        let p = parse(Some(DOCKER_MANIFEST), body.as_bytes()).unwrap();
        assert_eq!(p.blobs, vec![CFG.parse().unwrap()]);
    }

    #[test]
    fn media_type_from_header_when_body_has_none() {
        let body = image("").replace(&format!(r#""mediaType":"{OCI_MANIFEST}","#), "");
        assert_eq!(parse(Some(OCI_MANIFEST), body.as_bytes()).unwrap().media_type, OCI_MANIFEST);
    }

    #[test]
    fn rejects_bad_manifests() {
        let mismatch = parse(Some(OCI_INDEX), image("").as_bytes()).unwrap_err();
        assert_eq!(mismatch.code, ErrorCode::ManifestInvalid);
        assert_eq!(parse(Some(OCI_MANIFEST), b"not json").unwrap_err().code, ErrorCode::ManifestInvalid);
        let v1 = image("").replace("\"schemaVersion\":2", "\"schemaVersion\":1");
        assert_eq!(parse(None, v1.as_bytes()).unwrap_err().code, ErrorCode::ManifestInvalid);
        let big = vec![b' '; MAX_MANIFEST_SIZE + 1];
        assert_eq!(parse(None, &big).unwrap_err().status, 413);
    }

    #[test]
    fn only_manifest_media_types() {
        let html = br#"{"schemaVersion":2,"mediaType":"text/html","x":"<script>alert(1)</script>"}"#;
        assert_eq!(parse(Some("text/html"), html).unwrap_err().code, ErrorCode::ManifestInvalid);
        let body = br#"{"schemaVersion":2,"foo":1}"#;
        assert_eq!(parse(Some("application/vnd.example+json"), body).unwrap_err().code, ErrorCode::ManifestInvalid);
    }

    #[test]
    fn index_children() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{L1}","size":7,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        let p = parse(Some(OCI_INDEX), body.as_bytes()).unwrap();
        assert_eq!(p.manifests, vec![L1.parse().unwrap()]);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..300), ct in proptest::option::of(".{0,40}")) {
            let _ = parse(ct.as_deref(), &body);
        }
    }
}
