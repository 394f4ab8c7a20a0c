//! Records of the registry: stored blobs, manifests, upload sessions, users, tokens, keys.
//!
//! Every conversion destructures both sides, so a field added to either the Rust type or the
//! message fails to compile here until it travels.

use berth_core::access::{Package, Scope};
use berth_core::store::{
    GcReport, NodeState, NodeStats, PackageSummary, PackageVersion, PlacementMap, PublicSigningKey, Pusher,
    StorageChange, StorageNode, TokenOwner, TokenRecord, User,
};
use berth_core::{Digest, ManifestRecord, Stored, UploadSession};
use berth_proto::meta as pb;

use super::{from_all, from_opt, required, to_all, Wire, WireError};

impl Wire for Stored {
    type Proto = pb::Stored;

    fn to_proto(self) -> pb::Stored {
        let Stored { size, stamp } = self;
        pb::Stored { size, stamp }
    }

    fn from_proto(p: pb::Stored) -> Result<Stored, WireError> {
        let pb::Stored { size, stamp } = p;
        Ok(Stored { size, stamp })
    }
}

impl Wire for PackageSummary {
    type Proto = pb::PackageSummary;

    fn to_proto(self) -> pb::PackageSummary {
        let PackageSummary { package, versions, updated_ms } = self;
        pb::PackageSummary { package: Some(package.to_proto()), versions, updated_ms }
    }

    fn from_proto(p: pb::PackageSummary) -> Result<PackageSummary, WireError> {
        let pb::PackageSummary { package, versions, updated_ms } = p;
        Ok(PackageSummary { package: Package::from_proto(required(package, "package")?)?, versions, updated_ms })
    }
}

impl Wire for PackageVersion {
    type Proto = pb::PackageVersion;

    fn to_proto(self) -> pb::PackageVersion {
        let PackageVersion { record, tags, deleted_ms, downloads } = self;
        pb::PackageVersion { record: Some(record.to_proto()), tags, deleted_ms, downloads }
    }

    fn from_proto(p: pb::PackageVersion) -> Result<PackageVersion, WireError> {
        let pb::PackageVersion { record, tags, deleted_ms, downloads } = p;
        Ok(PackageVersion {
            record: ManifestRecord::from_proto(required(record, "record")?)?,
            tags,
            deleted_ms,
            downloads,
        })
    }
}

impl Wire for GcReport {
    type Proto = pb::GcReport;

    fn to_proto(self) -> pb::GcReport {
        let GcReport { dry_run, blobs, bytes, copies, copy_bytes, kept, strays, stray_bytes, rounds, millis } = self;
        pb::GcReport { dry_run, blobs, bytes, copies, copy_bytes, kept, strays, stray_bytes, rounds, millis }
    }

    fn from_proto(p: pb::GcReport) -> Result<GcReport, WireError> {
        let pb::GcReport { dry_run, blobs, bytes, copies, copy_bytes, kept, strays, stray_bytes, rounds, millis } = p;
        Ok(GcReport { dry_run, blobs, bytes, copies, copy_bytes, kept, strays, stray_bytes, rounds, millis })
    }
}

impl Wire for ManifestRecord {
    type Proto = pb::ManifestRecord;

    fn to_proto(self) -> pb::ManifestRecord {
        let ManifestRecord {
            digest,
            media_type,
            size,
            subject,
            artifact_type,
            annotations,
            blobs,
            manifests,
            pushed_at_ms,
        } = self;
        pb::ManifestRecord {
            digest: digest.to_proto(),
            media_type,
            size,
            subject: subject.map(Digest::to_proto),
            artifact_type,
            annotations: annotations.into_iter().collect(),
            blobs: to_all(blobs),
            manifests: to_all(manifests),
            pushed_at_ms,
        }
    }

    fn from_proto(p: pb::ManifestRecord) -> Result<ManifestRecord, WireError> {
        let pb::ManifestRecord {
            digest,
            media_type,
            size,
            subject,
            artifact_type,
            annotations,
            blobs,
            manifests,
            pushed_at_ms,
        } = p;
        Ok(ManifestRecord {
            digest: Digest::from_proto(digest)?,
            media_type,
            size,
            subject: from_opt(subject)?,
            artifact_type,
            annotations: annotations.into_iter().collect(),
            blobs: from_all::<Digest, _>(blobs)?,
            manifests: from_all::<Digest, _>(manifests)?,
            pushed_at_ms,
        })
    }
}

impl Wire for UploadSession {
    type Proto = pb::UploadSession;

    fn to_proto(self) -> pb::UploadSession {
        let UploadSession { id, repo, started_at_ms, owner, staging } = self;
        pb::UploadSession { id, repo, started_at_ms, owner, staging }
    }

    fn from_proto(p: pb::UploadSession) -> Result<UploadSession, WireError> {
        let pb::UploadSession { id, repo, started_at_ms, owner, staging } = p;
        Ok(UploadSession { id, repo, started_at_ms, owner, staging })
    }
}

impl Wire for Pusher {
    type Proto = pb::Pusher;

    fn to_proto(self) -> pb::Pusher {
        let Pusher { source, creator } = self;
        pb::Pusher { source, creator }
    }

    fn from_proto(p: pb::Pusher) -> Result<Pusher, WireError> {
        let pb::Pusher { source, creator } = p;
        Ok(Pusher { source, creator })
    }
}

/// The blob an upload ends with.
impl Wire for (Digest, Stored) {
    type Proto = pb::UploadLink;

    fn to_proto(self) -> pb::UploadLink {
        let (digest, blob) = self;
        pb::UploadLink { digest: digest.to_proto(), blob: Some(blob.to_proto()) }
    }

    fn from_proto(p: pb::UploadLink) -> Result<(Digest, Stored), WireError> {
        let pb::UploadLink { digest, blob } = p;
        Ok((Digest::from_proto(digest)?, Stored::from_proto(required(blob, "UploadLink.blob")?)?))
    }
}

impl Wire for User {
    type Proto = pb::User;

    fn to_proto(self) -> pb::User {
        let User { name, site_admin, created_ms } = self;
        pb::User { name, site_admin, created_ms }
    }

    fn from_proto(p: pb::User) -> Result<User, WireError> {
        let pb::User { name, site_admin, created_ms } = p;
        Ok(User { name, site_admin, created_ms })
    }
}

impl Wire for TokenOwner {
    type Proto = pb::TokenOwner;

    fn to_proto(self) -> pb::TokenOwner {
        use pb::token_owner::Owner;
        let owner = match self {
            TokenOwner::User(name) => Owner::User(name),
            TokenOwner::Ci(source) => Owner::Ci(source),
        };
        pb::TokenOwner { owner: Some(owner) }
    }

    fn from_proto(p: pb::TokenOwner) -> Result<TokenOwner, WireError> {
        use pb::token_owner::Owner;
        Ok(match required(p.owner, "TokenOwner.owner")? {
            Owner::User(name) => TokenOwner::User(name),
            Owner::Ci(source) => TokenOwner::Ci(source),
        })
    }
}

impl Wire for TokenRecord {
    type Proto = pb::TokenRecord;

    fn to_proto(self) -> pb::TokenRecord {
        let TokenRecord { id, owner, name, scopes, sha256, created_ms, expires_ms, last_used_ms } = self;
        pb::TokenRecord {
            id,
            owner: Some(owner.to_proto()),
            name,
            scopes: to_all(scopes),
            sha256,
            created_ms,
            expires_ms,
            last_used_ms,
        }
    }

    fn from_proto(p: pb::TokenRecord) -> Result<TokenRecord, WireError> {
        let pb::TokenRecord { id, owner, name, scopes, sha256, created_ms, expires_ms, last_used_ms } = p;
        Ok(TokenRecord {
            id,
            owner: TokenOwner::from_proto(required(owner, "TokenRecord.owner")?)?,
            name,
            scopes: from_all::<Scope, _>(scopes)?,
            sha256,
            created_ms,
            expires_ms,
            last_used_ms,
        })
    }
}

impl Wire for PublicSigningKey {
    type Proto = pb::PublicSigningKey;

    fn to_proto(self) -> pb::PublicSigningKey {
        let PublicSigningKey { kid, x, owner, created_ms, retire_after_ms } = self;
        pb::PublicSigningKey { kid, x, owner, created_ms, retire_after_ms }
    }

    fn from_proto(p: pb::PublicSigningKey) -> Result<PublicSigningKey, WireError> {
        let pb::PublicSigningKey { kid, x, owner, created_ms, retire_after_ms } = p;
        Ok(PublicSigningKey { kid, x, owner, created_ms, retire_after_ms })
    }
}

impl Wire for StorageNode {
    type Proto = pb::StorageNode;

    fn to_proto(self) -> pb::StorageNode {
        let StorageNode { name, addr, zone, capacity, seen_ms, state, stats, since_version } = self;
        let state = match state {
            NodeState::Live => pb::NodeState::Live,
            NodeState::Dead => pb::NodeState::Dead,
            NodeState::Draining => pb::NodeState::Draining,
        } as i32;
        pb::StorageNode { name, addr, zone, capacity, seen_ms, state, stats: Some(stats.to_proto()), since_version }
    }

    fn from_proto(p: pb::StorageNode) -> Result<StorageNode, WireError> {
        let pb::StorageNode { name, addr, zone, capacity, seen_ms, state, stats, since_version } = p;
        if name.is_empty() {
            return Err(WireError::Missing("StorageNode.name"));
        }
        if addr.is_empty() {
            return Err(WireError::Missing("StorageNode.addr"));
        }
        let state = match pb::NodeState::try_from(state) {
            Ok(pb::NodeState::Live) => NodeState::Live,
            Ok(pb::NodeState::Dead) => NodeState::Dead,
            Ok(pb::NodeState::Draining) => NodeState::Draining,
            Err(_) => return Err(WireError::Enum { what: "NodeState", value: state }),
        };
        let stats = stats.map(NodeStats::from_proto).transpose()?.unwrap_or_default();
        Ok(StorageNode { name, addr, zone, capacity, seen_ms, state, stats, since_version })
    }
}

impl Wire for NodeStats {
    type Proto = pb::NodeStats;

    fn to_proto(self) -> pb::NodeStats {
        let NodeStats {
            blobs,
            bytes,
            queued,
            checked,
            copies_made,
            bytes_moved,
            copies_dropped,
            move_rate,
            pass_version,
            scrubbed,
            scrub_passes,
            scrub_rate,
            damaged,
            mended,
        } = self;
        pb::NodeStats {
            blobs,
            bytes,
            queued,
            checked,
            copies_made,
            bytes_moved,
            copies_dropped,
            move_rate,
            pass_version,
            scrubbed,
            scrub_passes,
            scrub_rate,
            damaged,
            mended,
        }
    }

    fn from_proto(p: pb::NodeStats) -> Result<NodeStats, WireError> {
        let pb::NodeStats {
            blobs,
            bytes,
            queued,
            checked,
            copies_made,
            bytes_moved,
            copies_dropped,
            move_rate,
            pass_version,
            scrubbed,
            scrub_passes,
            scrub_rate,
            damaged,
            mended,
        } = p;
        Ok(NodeStats {
            blobs,
            bytes,
            queued,
            checked,
            copies_made,
            bytes_moved,
            copies_dropped,
            move_rate,
            pass_version,
            scrubbed,
            scrub_passes,
            scrub_rate,
            damaged,
            mended,
        })
    }
}

impl Wire for StorageChange {
    type Proto = pb::ChangeStorageRequest;

    fn to_proto(self) -> pb::ChangeStorageRequest {
        use pb::change_storage_request::{Change, DeclareDead, Drain, Remove, Silent, Undrain};
        let change = match self {
            StorageChange::Drain { name } => Change::Drain(Drain { name }),
            StorageChange::Undrain { name } => Change::Undrain(Undrain { name }),
            StorageChange::Remove { name, force } => Change::Remove(Remove { name, force }),
            StorageChange::DeclareDead { nodes } => Change::DeclareDead(DeclareDead {
                nodes: nodes.into_iter().map(|(name, seen_ms)| Silent { name, seen_ms }).collect(),
            }),
        };
        pb::ChangeStorageRequest { change: Some(change) }
    }

    fn from_proto(p: pb::ChangeStorageRequest) -> Result<StorageChange, WireError> {
        use pb::change_storage_request::Change;
        Ok(match p.change.ok_or(WireError::Missing("ChangeStorageRequest.change"))? {
            Change::Drain(d) => StorageChange::Drain { name: d.name },
            Change::Undrain(u) => StorageChange::Undrain { name: u.name },
            Change::Remove(r) => StorageChange::Remove { name: r.name, force: r.force },
            Change::DeclareDead(d) => {
                StorageChange::DeclareDead { nodes: d.nodes.into_iter().map(|n| (n.name, n.seen_ms)).collect() }
            }
        })
    }
}

impl Wire for PlacementMap {
    type Proto = pb::PlacementMap;

    fn to_proto(self) -> pb::PlacementMap {
        pb::PlacementMap { version: self.version, nodes: to_all(self.nodes) }
    }

    fn from_proto(p: pb::PlacementMap) -> Result<PlacementMap, WireError> {
        Ok(PlacementMap { version: p.version, nodes: from_all(p.nodes)? })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeMap;
    use std::fmt::Debug;

    use super::*;

    /// Asserts that `value` survives the wire unchanged.
    pub fn round_trips<T: Wire + Clone + PartialEq + Debug>(value: T) {
        assert_eq!(T::from_proto(value.clone().to_proto()), Ok(value));
    }

    fn d(s: &str) -> Digest {
        Digest::sha256_of(s.as_bytes())
    }

    /// Manifest records from the sparsest to the fullest.
    pub fn manifests() -> Vec<ManifestRecord> {
        let bare = ManifestRecord {
            digest: d("m"),
            media_type: String::new(),
            size: 0,
            subject: None,
            artifact_type: None,
            annotations: BTreeMap::new(),
            blobs: vec![],
            manifests: vec![],
            pushed_at_ms: 0,
        };
        let full = ManifestRecord {
            digest: d("full"),
            media_type: "application/vnd.oci.image.index.v1+json".into(),
            size: u64::MAX,
            subject: Some(d("subject")),
            artifact_type: Some("application/x-sig".into()),
            annotations: [
                ("org.opencontainers.image.source".to_string(), "https://x/y".to_string()),
                ("é".into(), "".into()),
            ]
            .into(),
            blobs: vec![d("config"), d("layer"), d("layer")],
            manifests: vec![d("child-a"), d("child-b")],
            pushed_at_ms: 1_700_000_000_000,
        };
        vec![bare, full]
    }

    /// Token records of both owners, with and without optional fields.
    pub fn tokens() -> Vec<TokenRecord> {
        let pat = TokenRecord {
            id: "tok1".into(),
            owner: TokenOwner::User("alice".into()),
            name: "laptop".into(),
            scopes: vec![Scope::ReadPackages, Scope::WritePackages, Scope::DeletePackages],
            sha256: "ab".repeat(32),
            created_ms: 5,
            expires_ms: Some(9),
            last_used_ms: Some(7),
        };
        let ci = TokenRecord {
            owner: TokenOwner::Ci("acme/repo".into()),
            scopes: vec![],
            expires_ms: None,
            last_used_ms: None,
            ..pat.clone()
        };
        vec![pat, ci]
    }

    /// Signing keys, live and retired.
    pub fn keys() -> Vec<PublicSigningKey> {
        let live = PublicSigningKey {
            kid: "k1".into(),
            x: "AAAA".into(),
            owner: "frontend-1".into(),
            created_ms: 3,
            retire_after_ms: None,
        };
        vec![live.clone(), PublicSigningKey { retire_after_ms: Some(u64::MAX), ..live }]
    }

    #[test]
    fn records_round_trip() {
        round_trips(Stored { size: 0, stamp: 0 });
        round_trips(Stored { size: u64::MAX, stamp: 42 });
        manifests().into_iter().for_each(round_trips);
        round_trips(UploadSession {
            id: "u-1".into(),
            repo: "a/b".into(),
            started_at_ms: 8,
            owner: String::new(),
            staging: Some("node-1".into()),
        });
        round_trips(UploadSession {
            id: "u-2".into(),
            repo: "a/b".into(),
            started_at_ms: 8,
            owner: "ci".into(),
            staging: None,
        });
        round_trips((d("blob"), Stored { size: 3, stamp: 4 }));
        round_trips(Pusher { source: Some("acme/web".into()), creator: None });
        round_trips(Pusher { source: None, creator: Some("mia".into()) });
        round_trips(Pusher::default());
        round_trips(User { name: "alice".into(), site_admin: true, created_ms: 1 });
        round_trips(User { name: String::new(), site_admin: false, created_ms: 0 });
        tokens().into_iter().for_each(round_trips);
        keys().into_iter().for_each(round_trips);
    }

    #[test]
    fn malformed_records_are_refused() {
        let mut m = manifests()[1].clone().to_proto();
        m.blobs.push("sha256:short".into());
        assert!(matches!(ManifestRecord::from_proto(m), Err(WireError::Digest { .. })));
        let mut m = manifests()[1].clone().to_proto();
        m.subject = Some("nope".into());
        assert!(matches!(ManifestRecord::from_proto(m), Err(WireError::Digest { .. })));
        let mut t = tokens()[0].clone().to_proto();
        t.owner = None;
        assert_eq!(TokenRecord::from_proto(t), Err(WireError::Missing("TokenRecord.owner")));
        let mut t = tokens()[0].clone().to_proto();
        t.owner = Some(pb::TokenOwner { owner: None });
        assert_eq!(TokenRecord::from_proto(t), Err(WireError::Missing("TokenOwner.owner")));
        let mut t = tokens()[0].clone().to_proto();
        t.scopes.push(0);
        assert_eq!(TokenRecord::from_proto(t), Err(WireError::Enum { what: "Scope", value: 0 }));
        let link = pb::UploadLink { digest: d("x").to_string(), blob: None };
        assert_eq!(<(Digest, Stored)>::from_proto(link), Err(WireError::Missing("UploadLink.blob")));
    }
}
