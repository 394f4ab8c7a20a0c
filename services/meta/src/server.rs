//! The Meta service over gRPC: a thin adapter from `proto/meta.proto` to a [`MetaStore`].
//!
//! Each call first asks the node's [`Leadership`] gate whether it may answer (reads too: a
//! follower's state may lag the leader's), then decodes the request into the registry's
//! types, calls the store and encodes its answer. A refused gate becomes a NotLeader status,
//! a registry error an ABORTED status that the client reads back unchanged, a malformed
//! request INVALID_ARGUMENT (see [`crate::wire`]).

use std::sync::Arc;

use async_trait::async_trait;
use berth_core::access::{AccessFacts, Identity, SourceRepo};
use berth_core::error::Result;
use berth_core::store::{DirectoryChange, PublicSigningKey, Pusher, StorageChange, StorageNode, TokenRecord, User};
use berth_core::{Digest, ErrorCode, ManifestRecord, MetaStore, RegistryError, Stored, UploadSession};
use berth_proto::meta as pb;
use berth_proto::meta::meta_server::{Meta, MetaServer};
use tonic::{Request, Response, Status};

use crate::wire::{
    count, from_all, from_opt, not_leader_status, required, status_of, to_all, Wire, WireError, MAX_MESSAGE,
};

/// Why this node may not answer: another node leads, or none does yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not the leader (leader: {})", .leader.as_deref().unwrap_or("unknown"))]
pub struct NotLeader {
    /// The leader's gRPC address, when this node knows it.
    pub leader: Option<String>,
}

/// Decides, before every call, whether this node may answer it.
#[async_trait]
pub trait Leadership: Send + Sync + 'static {
    /// `Ok` when this node leads and its state reflects every acknowledged write.
    async fn check(&self) -> Result<(), NotLeader>;
}

/// The gate of a single-voter group, whose one node always leads.
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysLeader;

#[async_trait]
impl Leadership for AlwaysLeader {
    async fn check(&self) -> Result<(), NotLeader> {
        Ok(())
    }
}

/// The Meta service's handlers over one store and its gate.
pub struct MetaRpc {
    store: Arc<dyn MetaStore>,
    gate: Arc<dyn Leadership>,
}

/// The Meta service to add to a tonic server.
pub fn meta_server(store: Arc<dyn MetaStore>, gate: Arc<dyn Leadership>) -> MetaServer<MetaRpc> {
    MetaServer::new(MetaRpc { store, gate })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// A handler's outcome: the reply, or the status that carries the error.
type Answer<T> = std::result::Result<Response<T>, Status>;

/// The store's answer, encoded.
fn answer<T, R>(result: Result<T>, encode: impl FnOnce(T) -> R) -> Answer<R> {
    result.map(|v| Response::new(encode(v))).map_err(status_of)
}

/// A digest of a batched read, or that read's refusal (a batch answers each read on its own).
fn batch_digest(s: String) -> Result<Digest> {
    Digest::from_proto(s).map_err(|e| RegistryError::new(ErrorCode::DigestInvalid, e.to_string()))
}

/// A batched read or write the store refused, as it travels back in the batch's reply.
fn refusal(e: RegistryError) -> pb::ReadError {
    let (code, status, detail) = berth_proto::status::error_fields(e);
    pb::ReadError { code, status, detail }
}

/// A batched write that does not decode: refused by itself, as a 500 (the peer sending it is
/// broken, not the user's request; the others in its batch are answered).
fn malformed(e: WireError) -> RegistryError {
    RegistryError::internal(format!("a malformed write: {e}"))
}

impl MetaRpc {
    /// One write of a batch, decoded and committed (or refused) on its own.
    async fn batched_write(&self, write: pb::Write) -> Result<()> {
        use pb::write::Write;
        match write.write {
            Some(Write::CreateUpload(r)) => {
                let session = required(r.session, "session").and_then(UploadSession::from_proto).map_err(malformed)?;
                let pusher = from_opt::<Pusher>(r.pusher).map_err(malformed)?;
                self.store.create_upload(session, usize::try_from(r.at_most).unwrap_or(usize::MAX), pusher).await
            }
            Some(Write::EndUpload(r)) => {
                let link = from_opt::<(Digest, Stored)>(r.link).map_err(malformed)?;
                self.store.end_upload(&r.id, link).await
            }
            Some(Write::LinkBlob(r)) => {
                let digest = Digest::from_proto(r.digest).map_err(malformed)?;
                let blob = required(r.blob, "blob").and_then(Stored::from_proto).map_err(malformed)?;
                self.store.link_blob(&r.repo, &digest, blob).await
            }
            Some(Write::PutManifest(r)) => {
                let record = required(r.record, "record").and_then(ManifestRecord::from_proto).map_err(malformed)?;
                let bytes = required(r.bytes, "bytes").and_then(Stored::from_proto).map_err(malformed)?;
                let pusher = from_opt::<Pusher>(r.pusher).map_err(malformed)?;
                self.store.put_manifest(&r.repo, record, r.tags, bytes, pusher).await
            }
            None => Err(malformed(WireError::Missing("Write.write"))),
        }
    }

    /// The request's message, once the gate lets this node answer.
    async fn admit<T>(&self, request: Request<T>) -> std::result::Result<T, Status> {
        self.gate.check().await.map_err(|n| not_leader_status(&n))?;
        Ok(request.into_inner())
    }
}

#[tonic::async_trait]
impl Meta for MetaRpc {
    // ---- blobs, manifests and tags --------------------------------------------------------

    async fn link_blob(&self, request: Request<pb::LinkBlobRequest>) -> Answer<pb::LinkBlobReply> {
        let r = self.admit(request).await?;
        let (digest, blob) = (Digest::from_proto(r.digest)?, Stored::from_proto(required(r.blob, "blob")?)?);
        answer(self.store.link_blob(&r.repo, &digest, blob).await, |()| pb::LinkBlobReply {})
    }

    async fn blob_link(&self, request: Request<pb::BlobLinkRequest>) -> Answer<pb::BlobLinkReply> {
        let r = self.admit(request).await?;
        let digest = Digest::from_proto(r.digest)?;
        answer(self.store.blob_link(&r.repo, &digest).await, |size| pb::BlobLinkReply { size })
    }

    async fn unlink_blob(&self, request: Request<pb::UnlinkBlobRequest>) -> Answer<pb::UnlinkBlobReply> {
        let r = self.admit(request).await?;
        let digest = Digest::from_proto(r.digest)?;
        answer(self.store.unlink_blob(&r.repo, &digest).await, |existed| pb::UnlinkBlobReply { existed })
    }

    async fn put_manifest(&self, request: Request<pb::PutManifestRequest>) -> Answer<pb::PutManifestReply> {
        let r = self.admit(request).await?;
        let record = ManifestRecord::from_proto(required(r.record, "record")?)?;
        let bytes = Stored::from_proto(required(r.bytes, "bytes")?)?;
        let pusher = from_opt::<Pusher>(r.pusher)?;
        answer(self.store.put_manifest(&r.repo, record, r.tags, bytes, pusher).await, |()| pb::PutManifestReply {})
    }

    async fn manifest(&self, request: Request<pb::ManifestRequest>) -> Answer<pb::ManifestReply> {
        let r = self.admit(request).await?;
        let digest = Digest::from_proto(r.digest)?;
        answer(self.store.manifest(&r.repo, &digest).await, |m| pb::ManifestReply { record: m.map(Wire::to_proto) })
    }

    async fn tag(&self, request: Request<pb::TagRequest>) -> Answer<pb::TagReply> {
        let r = self.admit(request).await?;
        answer(self.store.tag(&r.repo, &r.tag).await, |d| pb::TagReply { digest: d.map(Wire::to_proto) })
    }

    async fn read_batch(&self, request: Request<pb::ReadBatchRequest>) -> Answer<pb::ReadBatchReply> {
        use pb::read::Read;
        use pb::read_result::Result as R;
        let r = self.admit(request).await?;
        let mut results = Vec::with_capacity(r.reads.len());
        for read in r.reads {
            let outcome: Result<R> = match read.read {
                Some(Read::TaggedManifest(q)) => self
                    .store
                    .tagged_manifest(&q.repo, &q.tag)
                    .await
                    .map(|m| R::Manifest(pb::ManifestReply { record: m.map(Wire::to_proto) })),
                Some(Read::Manifest(q)) => match batch_digest(q.digest) {
                    Ok(digest) => self
                        .store
                        .manifest(&q.repo, &digest)
                        .await
                        .map(|m| R::Manifest(pb::ManifestReply { record: m.map(Wire::to_proto) })),
                    Err(e) => Err(e),
                },
                Some(Read::BlobLink(q)) => match batch_digest(q.digest) {
                    Ok(digest) => {
                        self.store.blob_link(&q.repo, &digest).await.map(|size| R::BlobLink(pb::BlobLinkReply { size }))
                    }
                    Err(e) => Err(e),
                },
                Some(Read::Upload(q)) => self
                    .store
                    .upload(&q.id)
                    .await
                    .map(|s| R::Upload(pb::UploadReply { session: s.map(Wire::to_proto) })),
                Some(Read::Token(q)) => {
                    self.store.token(&q.id).await.map(|t| R::Token(pb::TokenReply { token: t.map(Wire::to_proto) }))
                }
                Some(Read::User(q)) => {
                    self.store.user(&q.name).await.map(|u| R::User(pb::UserReply { user: u.map(Wire::to_proto) }))
                }
                Some(Read::AccessFacts(q)) => match q.who.map(Identity::from_proto) {
                    Some(Ok(who)) => self
                        .store
                        .access_facts(&who, &q.repo)
                        .await
                        .map(|f| R::AccessFacts(pb::AccessFactsReply { facts: Some(f.to_proto()) })),
                    _ => Err(RegistryError::new(ErrorCode::Unknown, "an access read without a valid identity")
                        .with_status(400)),
                },
                // One malformed read is refused by itself; the others in its batch are answered.
                None => Err(RegistryError::new(ErrorCode::Unknown, "a read without a query").with_status(400)),
            };
            let result = outcome.unwrap_or_else(|e| R::Error(refusal(e)));
            results.push(pb::ReadResult { result: Some(result) });
        }
        Ok(Response::new(pb::ReadBatchReply { results }))
    }

    async fn write_batch(&self, request: Request<pb::WriteBatchRequest>) -> Answer<pb::WriteBatchReply> {
        let r = self.admit(request).await?;
        // All at once, so that they reach the log together and share its next entry.
        let results = futures::future::join_all(r.writes.into_iter().map(|w| self.batched_write(w))).await;
        let results =
            results.into_iter().map(|outcome| pb::WriteResult { error: outcome.err().map(refusal) }).collect();
        Ok(Response::new(pb::WriteBatchReply { results }))
    }

    async fn tagged_manifest(&self, request: Request<pb::TagRequest>) -> Answer<pb::ManifestReply> {
        let r = self.admit(request).await?;
        answer(self.store.tagged_manifest(&r.repo, &r.tag).await, |m| pb::ManifestReply {
            record: m.map(Wire::to_proto),
        })
    }

    async fn delete_manifest(&self, request: Request<pb::DeleteManifestRequest>) -> Answer<pb::DeleteManifestReply> {
        let r = self.admit(request).await?;
        let digest = Digest::from_proto(r.digest)?;
        answer(self.store.delete_manifest(&r.repo, &digest).await, |existed| pb::DeleteManifestReply { existed })
    }

    async fn delete_tag(&self, request: Request<pb::DeleteTagRequest>) -> Answer<pb::DeleteTagReply> {
        let r = self.admit(request).await?;
        answer(self.store.delete_tag(&r.repo, &r.tag).await, |existed| pb::DeleteTagReply { existed })
    }

    async fn tags(&self, request: Request<pb::TagsRequest>) -> Answer<pb::TagsReply> {
        let r = self.admit(request).await?;
        let tags = self.store.tags(&r.repo, r.last.as_deref(), count(r.n)).await;
        answer(tags, |t| pb::TagsReply { list: t.map(|tags| pb::TagList { tags }) })
    }

    async fn repositories(&self, request: Request<pb::RepositoriesRequest>) -> Answer<pb::RepositoriesReply> {
        let r = self.admit(request).await?;
        let names = self.store.repositories(r.last.as_deref(), count(r.n)).await;
        answer(names, |names| pb::RepositoriesReply { names })
    }

    async fn public_repositories(
        &self,
        request: Request<pb::PublicRepositoriesRequest>,
    ) -> Answer<pb::PublicRepositoriesReply> {
        let r = self.admit(request).await?;
        let names = self.store.public_repositories(r.last.as_deref(), count(r.n)).await;
        answer(names, |names| pb::PublicRepositoriesReply { names })
    }

    async fn referrers(&self, request: Request<pb::ReferrersRequest>) -> Answer<pb::ReferrersReply> {
        let r = self.admit(request).await?;
        let (subject, after) = (Digest::from_proto(r.subject)?, from_opt::<Digest>(r.after)?);
        let records = self.store.referrers(&r.repo, &subject, after.as_ref(), count(r.n)).await;
        answer(records, |records| pb::ReferrersReply { records: to_all(records) })
    }

    async fn repo_exists(&self, request: Request<pb::RepoExistsRequest>) -> Answer<pb::RepoExistsReply> {
        let r = self.admit(request).await?;
        answer(self.store.repo_exists(&r.repo).await, |exists| pb::RepoExistsReply { exists })
    }

    // ---- upload sessions ------------------------------------------------------------------

    async fn create_upload(&self, request: Request<pb::CreateUploadRequest>) -> Answer<pb::CreateUploadReply> {
        let r = self.admit(request).await?;
        let session = UploadSession::from_proto(required(r.session, "session")?)?;
        let at_most = usize::try_from(r.at_most).unwrap_or(usize::MAX);
        let pusher = from_opt::<Pusher>(r.pusher)?;
        answer(self.store.create_upload(session, at_most, pusher).await, |()| pb::CreateUploadReply {})
    }

    async fn upload(&self, request: Request<pb::UploadRequest>) -> Answer<pb::UploadReply> {
        let r = self.admit(request).await?;
        answer(self.store.upload(&r.id).await, |s| pb::UploadReply { session: s.map(Wire::to_proto) })
    }

    async fn uploads(&self, request: Request<pb::UploadsRequest>) -> Answer<pb::UploadsReply> {
        let r = self.admit(request).await?;
        let sessions = self.store.uploads(r.after.as_deref(), count(r.n)).await;
        answer(sessions, |sessions| pb::UploadsReply { sessions: to_all(sessions) })
    }

    async fn uploads_of(&self, request: Request<pb::UploadsOfRequest>) -> Answer<pb::UploadsOfReply> {
        let r = self.admit(request).await?;
        let n = self.store.uploads_of(&r.caller, count(r.at_most)).await;
        answer(n, |n| pb::UploadsOfReply { count: n as u64 })
    }

    async fn end_upload(&self, request: Request<pb::EndUploadRequest>) -> Answer<pb::EndUploadReply> {
        let r = self.admit(request).await?;
        let link = from_opt::<(Digest, Stored)>(r.link)?;
        answer(self.store.end_upload(&r.id, link).await, |()| pb::EndUploadReply {})
    }

    // ---- garbage collection ---------------------------------------------------------------

    async fn packages_of(&self, request: Request<pb::PackagesOfRequest>) -> Answer<pb::PackagesOfReply> {
        let r = self.admit(request).await?;
        answer(self.store.packages_of(&r.owner).await, |p| pb::PackagesOfReply { packages: to_all(p) })
    }

    async fn package_versions(&self, request: Request<pb::PackageVersionsRequest>) -> Answer<pb::PackageVersionsReply> {
        let r = self.admit(request).await?;
        answer(self.store.package_versions(&r.repo).await, |v| pb::PackageVersionsReply { versions: to_all(v) })
    }

    async fn collect_garbage(&self, request: Request<pb::CollectGarbageRequest>) -> Answer<pb::GcReport> {
        let r = self.admit(request).await?;
        answer(self.store.collect_garbage(r.dry_run).await, Wire::to_proto)
    }

    async fn register_storage(&self, request: Request<pb::RegisterStorageRequest>) -> Answer<pb::RegisterStorageReply> {
        let r = self.admit(request).await?;
        let node = StorageNode::from_proto(required(r.node, "node")?)?;
        answer(self.store.register_storage(node).await, |()| pb::RegisterStorageReply {})
    }

    async fn change_storage(&self, request: Request<pb::ChangeStorageRequest>) -> Answer<pb::ChangeStorageReply> {
        let r = self.admit(request).await?;
        let change = StorageChange::from_proto(r)?;
        answer(self.store.change_storage(change).await, |changed| pb::ChangeStorageReply { changed })
    }

    async fn placement(&self, request: Request<pb::PlacementRequest>) -> Answer<pb::PlacementMap> {
        self.admit(request).await?;
        answer(self.store.placement().await, Wire::to_proto)
    }

    async fn note_short_copies(
        &self,
        request: Request<pb::NoteShortCopiesRequest>,
    ) -> Answer<pb::NoteShortCopiesReply> {
        let r = self.admit(request).await?;
        answer(self.store.note_short_copies(from_all::<Digest, _>(r.digests)?).await, |()| pb::NoteShortCopiesReply {})
    }

    async fn short_copies(&self, request: Request<pb::ShortCopiesRequest>) -> Answer<pb::ShortCopiesReply> {
        let r = self.admit(request).await?;
        let after = r.after.map(Digest::from_proto).transpose()?;
        let short = self.store.short_copies(after.as_ref(), count(r.n)).await;
        answer(short, |digests| pb::ShortCopiesReply { digests: to_all(digests) })
    }

    async fn copies_repaired(&self, request: Request<pb::CopiesRepairedRequest>) -> Answer<pb::CopiesRepairedReply> {
        let r = self.admit(request).await?;
        let digest = Digest::from_proto(r.digest)?;
        answer(self.store.copies_repaired(&digest).await, |()| pb::CopiesRepairedReply {})
    }

    // ---- accounts and permissions ---------------------------------------------------------

    async fn change_directory(&self, request: Request<pb::ChangeDirectoryRequest>) -> Answer<pb::ChangeDirectoryReply> {
        let r = self.admit(request).await?;
        let change = DirectoryChange::from_proto(required(r.change, "change")?)?;
        answer(self.store.change_directory(change).await, |changed| pb::ChangeDirectoryReply { changed })
    }

    async fn signing_keys(&self, request: Request<pb::SigningKeysRequest>) -> Answer<pb::SigningKeysReply> {
        self.admit(request).await?;
        answer(self.store.signing_keys().await, |keys: Vec<PublicSigningKey>| pb::SigningKeysReply {
            keys: to_all(keys),
        })
    }

    async fn key_generation(&self, request: Request<pb::KeyGenerationRequest>) -> Answer<pb::KeyGenerationReply> {
        self.admit(request).await?;
        answer(self.store.key_generation().await, |generation| pb::KeyGenerationReply { generation })
    }

    async fn has_legacy_signing_key(
        &self,
        request: Request<pb::HasLegacySigningKeyRequest>,
    ) -> Answer<pb::HasLegacySigningKeyReply> {
        self.admit(request).await?;
        answer(self.store.has_legacy_signing_key().await, |present| pb::HasLegacySigningKeyReply { present })
    }

    async fn user(&self, request: Request<pb::UserRequest>) -> Answer<pb::UserReply> {
        let r = self.admit(request).await?;
        answer(self.store.user(&r.name).await, |u: Option<User>| pb::UserReply { user: u.map(Wire::to_proto) })
    }

    async fn users(&self, request: Request<pb::UsersRequest>) -> Answer<pb::UsersReply> {
        self.admit(request).await?;
        answer(self.store.users().await, |users| pb::UsersReply { users: to_all(users) })
    }

    async fn token(&self, request: Request<pb::TokenRequest>) -> Answer<pb::TokenReply> {
        let r = self.admit(request).await?;
        answer(self.store.token(&r.id).await, |t: Option<TokenRecord>| pb::TokenReply { token: t.map(Wire::to_proto) })
    }

    async fn tokens_of(&self, request: Request<pb::TokensOfRequest>) -> Answer<pb::TokensOfReply> {
        let r = self.admit(request).await?;
        answer(self.store.tokens_of(&r.user).await, |tokens| pb::TokensOfReply { tokens: to_all(tokens) })
    }

    async fn org_members(&self, request: Request<pb::OrgMembersRequest>) -> Answer<pb::OrgMembersReply> {
        let r = self.admit(request).await?;
        answer(self.store.org_members(&r.org).await, |m| pb::OrgMembersReply { members: m.map(Wire::to_proto) })
    }

    async fn source_repo(&self, request: Request<pb::SourceRepoRequest>) -> Answer<pb::SourceRepoReply> {
        let r = self.admit(request).await?;
        let source = self.store.source_repo(&r.org, &r.name).await;
        answer(source, |s: Option<SourceRepo>| pb::SourceRepoReply { source: s.map(Wire::to_proto) })
    }

    async fn access_facts(&self, request: Request<pb::AccessFactsRequest>) -> Answer<pb::AccessFactsReply> {
        let r = self.admit(request).await?;
        let who = Identity::from_proto(required(r.who, "who")?)?;
        let facts = self.store.access_facts(&who, &r.repo).await;
        answer(facts, |f: AccessFacts| pb::AccessFactsReply { facts: Some(f.to_proto()) })
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use berth_core::access::{OrgRole, Perm, Principal, Scope};
    use berth_core::ErrorCode;
    use berth_proto::meta::meta_client::MetaClient as MetaGrpc;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;
    use tonic::transport::server::TcpIncoming;
    use tonic::transport::Server;
    use tonic::Code;

    use super::*;
    use crate::client::{MetaClient, MetaClientConfig};
    use crate::{MetaConfig, MetaService};

    /// A gate that counts the calls it sees, waits `delay` (and, when it has `turns`, for a
    /// turn the test hands out), then admits them or refuses them.
    struct Gate {
        refuse: Option<NotLeader>,
        delay: Duration,
        asked: AtomicUsize,
        turns: Option<Arc<tokio::sync::Semaphore>>,
    }

    impl Gate {
        fn new(refuse: Option<NotLeader>, delay: Duration) -> Arc<Gate> {
            Arc::new(Gate { refuse, delay, asked: AtomicUsize::new(0), turns: None })
        }

        /// A gate that admits a call only when the test adds a permit to `turns`.
        fn turns(turns: Arc<tokio::sync::Semaphore>) -> Arc<Gate> {
            Arc::new(Gate { refuse: None, delay: Duration::ZERO, asked: AtomicUsize::new(0), turns: Some(turns) })
        }

        /// Waits until `n` calls have reached the gate.
        async fn reached(&self, n: usize) {
            while self.asked() < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        fn asked(&self) -> usize {
            self.asked.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl Leadership for Gate {
        async fn check(&self) -> Result<(), NotLeader> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            if let Some(turns) = &self.turns {
                turns.acquire().await.expect("the test keeps the semaphore open").forget();
            }
            tokio::time::sleep(self.delay).await;
            self.refuse.clone().map_or(Ok(()), Err)
        }
    }

    /// A Meta server on a loopback port.
    struct Running {
        addr: SocketAddr,
        stop: oneshot::Sender<()>,
        task: JoinHandle<std::result::Result<(), tonic::transport::Error>>,
    }

    async fn serve(store: Arc<dyn MetaStore>, gate: Arc<dyn Leadership>) -> Running {
        let incoming = TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap().with_nodelay(Some(true));
        let addr = incoming.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = Server::builder().add_service(meta_server(store, gate));
        let task = tokio::spawn(server.serve_with_incoming_shutdown(incoming, async move {
            // A dropped sender stops the server as well as a sent stop.
            stopped.await.unwrap_or_default()
        }));
        Running { addr, stop, task }
    }

    impl Running {
        async fn stop(self) {
            self.stop.send(()).unwrap();
            self.task.await.unwrap().unwrap();
        }
    }

    async fn open(dir: &std::path::Path) -> MetaService {
        let config = MetaConfig { dir: dir.to_path_buf(), node_id: 1, advertise: "127.0.0.1:0".into() };
        MetaService::open_single(config).await.unwrap()
    }

    fn client(nodes: &[SocketAddr], config: MetaClientConfig) -> MetaClient {
        MetaClient::new(nodes.iter().map(SocketAddr::to_string).collect(), config).unwrap()
    }

    fn d(s: &str) -> Digest {
        Digest::sha256_of(s.as_bytes())
    }

    /// A stored copy with a stamp above any reap floor these tests reach.
    fn stored(size: u64) -> Stored {
        Stored { size, stamp: 1_000 }
    }

    fn record(name: &str, blobs: Vec<Digest>) -> ManifestRecord {
        ManifestRecord {
            digest: d(name),
            media_type: berth_core::manifest::OCI_MANIFEST.into(),
            size: 100,
            subject: None,
            artifact_type: Some("application/x-test".into()),
            annotations: [("org.opencontainers.image.description".to_string(), "a test".to_string())].into(),
            blobs,
            manifests: vec![],
            pushed_at_ms: 1,
        }
    }

    /// An address nothing listens on.
    fn dead_address() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_share_batches_and_each_gets_its_own_answer() {
        let dir = tempfile::tempdir().unwrap();
        let meta = open(dir.path()).await;
        let server = serve(Arc::new(meta.clone()), Arc::new(AlwaysLeader)).await;
        let c = Arc::new(client(&[server.addr], MetaClientConfig::default()));
        for i in 0..50u64 {
            c.link_blob("a/b", &d(&format!("blob{i}")), stored(i + 1)).await.unwrap();
        }
        let m1 = record("m1", vec![d("blob1")]);
        c.put_manifest("a/b", m1.clone(), vec!["v1".into()], stored(100), None).await.unwrap();
        let facts = meta.access_facts(&Identity::Anonymous, "a/b").await.unwrap();
        // 700 reads of seven kinds at once, each answered with its own result, unknowns too.
        let reads = (0..700u64).map(|i| {
            let (c, m1, facts) = (c.clone(), m1.clone(), facts.clone());
            async move {
                match i % 7 {
                    0 => assert_eq!(
                        c.blob_link("a/b", &d(&format!("blob{}", i % 60))).await.unwrap(),
                        (i % 60 < 50).then_some(i % 60 + 1)
                    ),
                    1 => assert_eq!(
                        c.tagged_manifest("a/b", if i % 8 == 1 { "v1" } else { "none" }).await.unwrap(),
                        (i % 8 == 1).then(|| m1.clone())
                    ),
                    2 => assert_eq!(c.manifest("a/b", &d("m1")).await.unwrap(), Some(m1.clone())),
                    3 => assert_eq!(c.upload(&format!("u{i}")).await.unwrap(), None),
                    // A token request's reads.
                    4 => assert_eq!(c.token(&format!("t{i}")).await.unwrap(), None),
                    5 => assert_eq!(c.user("nobody").await.unwrap(), None),
                    _ => assert_eq!(c.access_facts(&Identity::Anonymous, "a/b").await.unwrap(), facts),
                }
            }
        });
        futures::future::join_all(reads).await;
        server.stop().await;
    }

    /// The pusher travels with a push's first writes, batched or not, and their package is
    /// created on the leader in the same write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pusher_reaches_the_leader_with_the_first_write() {
        let dir = tempfile::tempdir().unwrap();
        let meta = open(dir.path()).await;
        let server = serve(Arc::new(meta.clone()), Arc::new(AlwaysLeader)).await;
        let c = client(&[server.addr], MetaClientConfig::default());
        let package = |repo: &'static str| {
            let meta = meta.clone();
            async move { meta.access_facts(&Identity::Anonymous, repo).await.unwrap().package }
        };
        let mia = Pusher { source: None, creator: Some("mia".into()) };
        let session = UploadSession {
            id: "u1".into(),
            repo: "acme/a".into(),
            started_at_ms: 0,
            owner: "mia".into(),
            staging: None,
        };
        c.create_upload(session, 0, Some(mia.clone())).await.unwrap();
        let p = package("acme/a").await.expect("created with the session");
        assert_eq!(p.grants.get(&Principal::User("mia".into())), Some(&Perm::Admin));
        c.link_blob("acme/b", &d("layer"), stored(5)).await.unwrap();
        c.put_manifest("acme/b", record("m", vec![d("layer")]), vec![], stored(9), Some(mia)).await.unwrap();
        assert!(package("acme/b").await.is_some(), "created with the manifest");
        // The unary call of older frontends carries it too.
        let ci = Pusher { source: Some("acme/web".into()), creator: None };
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr)).unwrap();
        let mut grpc = MetaGrpc::new(channel.connect_lazy());
        let session = UploadSession {
            id: "u2".into(),
            repo: "acme/c".into(),
            started_at_ms: 0,
            owner: "ci".into(),
            staging: None,
        };
        let msg =
            pb::CreateUploadRequest { session: Some(session.to_proto()), at_most: 0, pusher: Some(ci.to_proto()) };
        grpc.create_upload(msg).await.unwrap();
        assert_eq!(package("acme/c").await.unwrap().source.as_deref(), Some("acme/web"));
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_batches_and_each_gets_its_own_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let meta = open(dir.path()).await;
        // A slow gate: calls made while a batch waits on it gather into the next one.
        let gate = Gate::new(None, Duration::from_millis(20));
        let server = serve(Arc::new(meta.clone()), gate.clone()).await;
        let c = Arc::new(client(&[server.addr], MetaClientConfig::default()));
        meta.link_blob("a/b", &d("base"), stored(3)).await.unwrap();
        let session = |i: u64, owner: &str| UploadSession {
            id: format!("u{i}"),
            repo: "a/b".into(),
            started_at_ms: 1,
            owner: owner.into(),
            staging: None,
        };
        let last_entry = || meta.raft.metrics().borrow().last_log_index.unwrap_or(0);
        let entries_before = last_entry();
        // 500 writes of four kinds at once; some of each kind are refused, each for itself.
        let writes = (0..500u64).map(|i| {
            let c = c.clone();
            let (alice, bob) = (session(i, "alice"), session(i, "bob"));
            async move {
                let outcome = match i % 5 {
                    0 => c.link_blob("a/b", &d(&format!("blob{i}")), stored(i + 1)).await,
                    // Bob has no limit; alice may keep 20 uploads open.
                    1 => c.create_upload(bob, 0, None).await,
                    2 => c.create_upload(alice, 20, None).await,
                    // A manifest of a linked blob goes in; one of a missing blob is refused.
                    3 if i % 2 == 0 => {
                        let m = record(&format!("m{i}"), vec![d("missing")]);
                        c.put_manifest("a/b", m, vec![], stored(9), None).await
                    }
                    3 => {
                        let m = record(&format!("m{i}"), vec![d("base")]);
                        c.put_manifest("a/b", m, vec![format!("t{i}")], stored(9), None).await
                    }
                    _ => c.end_upload(&format!("gone{i}"), None).await,
                };
                (i, outcome)
            }
        });
        let outcomes = futures::future::join_all(writes).await;
        let mut refused_uploads = 0;
        for (i, outcome) in outcomes {
            match (i % 5, outcome) {
                (0 | 1, r) => assert_eq!(r, Ok(()), "write {i}"),
                (2, Ok(())) => {}
                (2, Err(e)) => {
                    assert_eq!(e.code, ErrorCode::TooManyRequests, "{e}");
                    refused_uploads += 1;
                }
                (3, r) if i % 2 == 0 => assert_eq!(r.unwrap_err().code, ErrorCode::ManifestBlobUnknown, "{i}"),
                (3, r) => assert_eq!(r, Ok(()), "manifest {i}"),
                (_, r) => assert_eq!(r.unwrap_err().code, ErrorCode::BlobUploadUnknown, "end {i}"),
            }
        }
        assert_eq!(refused_uploads, 100 - 20, "alice got exactly 20 sessions");
        assert_eq!(meta.uploads_of("alice", 1000).await.unwrap(), 20);
        assert_eq!(meta.uploads_of("bob", 1000).await.unwrap(), 100);
        for i in (0..500u64).step_by(5) {
            assert_eq!(meta.blob_link("a/b", &d(&format!("blob{i}"))).await.unwrap(), Some(i + 1));
            let m = i + 3;
            let tagged = meta.tag("a/b", &format!("t{m}")).await.unwrap();
            assert_eq!(tagged, (m % 2 == 1).then(|| d(&format!("m{m}"))), "manifest {m}");
        }
        assert!(gate.asked() < 100, "500 writes took {} calls", gate.asked());
        // The writes of a call reached the log together: far fewer entries than writes.
        let entries = last_entry() - entries_before;
        assert!(entries < 100, "500 writes took {entries} log entries");
        server.stop().await;
        meta.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_that_gives_up_takes_no_other_answer_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let meta = open(dir.path()).await;
        let turns = Arc::new(tokio::sync::Semaphore::new(0));
        let gate = Gate::turns(turns.clone());
        let server = serve(Arc::new(meta.clone()), gate.clone()).await;
        let c = Arc::new(client(&[server.addr], MetaClientConfig::default()));
        let link = |name: &'static str| {
            let c = c.clone();
            tokio::spawn(async move { c.link_blob("a/b", &d(name), stored(7)).await })
        };
        // Two batches under way, held at the gate; the next two writes wait for them.
        let (a, b) = (link("a"), link("b"));
        gate.reached(2).await;
        let (x, y) = (link("x"), link("y"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        turns.add_permits(2);
        assert_eq!(a.await.unwrap(), Ok(()));
        assert_eq!(b.await.unwrap(), Ok(()));
        // x and y went out together; x's caller gives up while their batch is at the gate.
        gate.reached(3).await;
        x.abort();
        turns.add_permits(1);
        assert_eq!(y.await.unwrap(), Ok(()), "the other write of the batch is answered");
        assert_eq!(meta.blob_link("a/b", &d("x")).await.unwrap(), Some(7), "x was sent and applied");
        assert_eq!(gate.asked(), 3);
        server.stop().await;
        meta.shutdown().await;
    }

    #[tokio::test]
    async fn a_malformed_write_is_refused_by_itself() {
        let dir = tempfile::tempdir().unwrap();
        let meta = open(dir.path()).await;
        let server = serve(Arc::new(meta.clone()), Arc::new(AlwaysLeader)).await;
        let mut raw = MetaGrpc::connect(format!("http://{}", server.addr)).await.unwrap();
        let link = |digest: String, blob| {
            let r = pb::LinkBlobRequest { repo: "a/b".into(), digest, blob };
            pb::Write { write: Some(pb::write::Write::LinkBlob(r)) }
        };
        let writes = vec![
            link("sha256:nope".into(), Some(stored(5).to_proto())),
            link(d("x").to_string(), Some(stored(5).to_proto())),
            pb::Write { write: None },
            link(d("y").to_string(), None),
        ];
        let reply = raw.write_batch(pb::WriteBatchRequest { writes }).await.unwrap().into_inner();
        let refused: Vec<Option<u32>> = reply.results.iter().map(|r| r.error.as_ref().map(|e| e.status)).collect();
        assert_eq!(refused, vec![Some(500), None, Some(500), Some(500)]);
        assert_eq!(meta.blob_link("a/b", &d("x")).await.unwrap(), Some(5), "the good write was applied");
        assert_eq!(meta.blob_link("a/b", &d("y")).await.unwrap(), None);
        server.stop().await;
        meta.shutdown().await;
    }

    #[tokio::test]
    async fn a_client_drives_a_real_metadata_service() {
        let dir = tempfile::tempdir().unwrap();
        let meta = open(dir.path()).await;
        let server = serve(Arc::new(meta.clone()), Arc::new(AlwaysLeader)).await;
        let c = client(&[server.addr], MetaClientConfig::default());

        c.link_blob("a/b", &d("layer"), stored(5)).await.unwrap();
        assert_eq!(c.blob_link("a/b", &d("layer")).await.unwrap(), Some(5));
        assert_eq!(c.blob_link("a/b", &d("other")).await.unwrap(), None);

        // A registry error comes back exactly as the store made it.
        let refused = || record("m0", vec![d("missing")]);
        let err = c.put_manifest("a/b", refused(), vec!["v0".into()], stored(100), None).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::ManifestBlobUnknown);
        let direct = meta.put_manifest("a/b", refused(), vec!["v0".into()], stored(100), None).await.unwrap_err();
        assert_eq!(err, direct);

        let m1 = record("m1", vec![d("layer")]);
        c.put_manifest("a/b", m1.clone(), vec!["v1".into(), "latest".into()], stored(100), None).await.unwrap();
        assert_eq!(c.tag("a/b", "v1").await.unwrap(), Some(d("m1")));
        assert_eq!(c.tags("a/b", None, 10).await.unwrap(), Some(vec!["latest".to_string(), "v1".to_string()]));
        assert_eq!(c.tags("a/b", Some("latest"), 10).await.unwrap(), Some(vec!["v1".to_string()]));
        assert_eq!(c.tags("x/y", None, 10).await.unwrap(), None);
        assert_eq!(c.manifest("a/b", &d("m1")).await.unwrap(), Some(m1));
        assert_eq!(c.repositories(None, 10).await.unwrap(), vec!["a/b".to_string()]);
        assert!(c.delete_manifest("a/b", &d("m1")).await.unwrap());
        assert!(!c.delete_manifest("a/b", &d("m1")).await.unwrap());
        assert_eq!(c.tag("a/b", "v1").await.unwrap(), None);

        let alice = User { name: "alice".into(), site_admin: false, created_ms: 3 };
        assert!(c.change_directory(DirectoryChange::CreateUser(alice.clone())).await.unwrap());
        assert!(!c.change_directory(DirectoryChange::CreateUser(alice.clone())).await.unwrap());
        assert_eq!(c.user("alice").await.unwrap(), Some(alice));
        assert_eq!(c.user("nobody").await.unwrap(), None);

        let org = DirectoryChange::CreateOrg { name: "acme".into(), owner: "alice".into() };
        assert!(c.change_directory(org).await.unwrap());
        let package = DirectoryChange::EnsurePackage {
            repo: "acme/app".into(),
            source: None,
            creator: Some("alice".into()),
            now_ms: 1,
        };
        c.change_directory(package).await.unwrap();
        let who = Identity::User { name: "alice".into(), scopes: [Scope::ReadPackages].into(), site_admin: false };
        let facts = c.access_facts(&who, "acme/app").await.unwrap();
        assert!(facts.owner_is_org);
        assert_eq!(facts.org_role, Some(OrgRole::Owner));
        assert!(facts.package.is_some());
        assert_eq!(facts, meta.access_facts(&who, "acme/app").await.unwrap());
        assert_eq!(c.access_facts(&Identity::Anonymous, "bob/app").await.unwrap(), AccessFacts::default());

        server.stop().await;
        meta.shutdown().await;
    }

    #[tokio::test]
    async fn the_client_follows_not_leader_and_remembers_the_leader() {
        let dir = tempfile::tempdir().unwrap();
        let meta = open(dir.path()).await;
        let store: Arc<dyn MetaStore> = Arc::new(meta.clone());
        let leader = serve(store.clone(), Arc::new(AlwaysLeader)).await;
        let gate = Gate::new(Some(NotLeader { leader: Some(leader.addr.to_string()) }), Duration::ZERO);
        let follower = serve(store, gate.clone()).await;
        // The client knows only the follower; the leader's address comes from its answer.
        let c = client(&[follower.addr], MetaClientConfig::default());

        c.link_blob("a/b", &d("layer"), stored(5)).await.unwrap();
        assert_eq!(gate.asked(), 1);
        assert_eq!(c.blob_link("a/b", &d("layer")).await.unwrap(), Some(5));
        assert_eq!(gate.asked(), 1, "the second call went straight to the leader");

        follower.stop().await;
        leader.stop().await;
        meta.shutdown().await;
    }

    #[tokio::test]
    async fn writes_skip_unreachable_nodes_and_give_up_with_503() {
        let dir = tempfile::tempdir().unwrap();
        let meta = open(dir.path()).await;
        let server = serve(Arc::new(meta.clone()), Arc::new(AlwaysLeader)).await;
        let c = client(&[dead_address(), server.addr], MetaClientConfig::default());
        c.link_blob("a/b", &d("layer"), stored(5)).await.unwrap();

        // No leader anywhere: the call ends after `retry_for` with 503.
        let gate = Gate::new(Some(NotLeader { leader: None }), Duration::ZERO);
        let leaderless = serve(Arc::new(meta.clone()), gate.clone()).await;
        let config = MetaClientConfig { retry_for: Duration::from_millis(300), ..Default::default() };
        let c = client(&[leaderless.addr, dead_address()], config);
        let err = c.link_blob("a/b", &d("layer"), stored(5)).await.unwrap_err();
        assert_eq!((err.code, err.status), (ErrorCode::Unknown, 503), "{err}");
        assert!(gate.asked() >= 2, "asked {} times", gate.asked());

        leaderless.stop().await;
        server.stop().await;
        meta.shutdown().await;
    }

    /// A listener that takes no connection: its queue of one is full, so the kernel drops new
    /// SYNs and a connect waits until it times out, as one to the address of a container that
    /// was killed does. Keep the stream: it fills the queue.
    fn unanswering() -> (tokio::net::TcpListener, std::net::TcpStream) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let filler = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("the queue takes one");
        (listener, filler)
    }

    /// The leader vanished, its address answering nothing, and a follower still names it:
    /// calls of every kind waiting on it, batched or not, move on together to the new leader
    /// within about one connect timeout, and the writes among them are applied.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_waiting_on_a_vanished_leader_move_on_together() {
        let dir = tempfile::tempdir().unwrap();
        let meta = open(dir.path()).await;
        let store: Arc<dyn MetaStore> = Arc::new(meta.clone());
        let leader = serve(store.clone(), Arc::new(AlwaysLeader)).await;
        let (vanished, _filler) = unanswering();
        let vanished = vanished.local_addr().unwrap();
        let gate = Gate::new(Some(NotLeader { leader: Some(vanished.to_string()) }), Duration::ZERO);
        let stale = serve(store, gate.clone()).await;
        // The vanished node comes first: with no leader known yet, every call starts there.
        let config = MetaClientConfig::default();
        let c = Arc::new(client(&[vanished, stale.addr, leader.addr], config.clone()));

        let started = std::time::Instant::now();
        let calls = (0..16u64).map(|i| {
            let c = c.clone();
            async move {
                let outcome = match i % 4 {
                    0 => c.link_blob("a/b", &d(&format!("blob{i}")), stored(i + 1)).await.map(|()| 0),
                    1 => c.blob_link("a/b", &d("none")).await.map(|_| 0),
                    2 => c.unlink_blob("a/b", &d("none")).await.map(|_| 0),
                    _ => c.key_generation().await,
                };
                (outcome, started.elapsed())
            }
        });
        let outcomes = futures::future::join_all(calls).await;
        for (i, (outcome, took)) in outcomes.iter().enumerate() {
            assert!(outcome.is_ok(), "call {i} failed after {took:?}: {outcome:?}");
            assert!(*took < 4 * config.connect_timeout, "call {i} took {took:?}");
        }
        assert_eq!(c.blob_link("a/b", &d("blob4")).await.unwrap(), Some(5), "the writes were applied");
        assert!(gate.asked() >= 1, "the stale follower was asked");

        stale.stop().await;
        leader.stop().await;
        meta.shutdown().await;
    }

    #[tokio::test]
    async fn a_timed_out_write_is_not_repeated_but_a_read_is() {
        let dir = tempfile::tempdir().unwrap();
        let meta = open(dir.path()).await;
        let gate = Gate::new(None, Duration::from_millis(300));
        let server = serve(Arc::new(meta.clone()), gate.clone()).await;
        let config = MetaClientConfig {
            retry_for: Duration::from_millis(600),
            request_timeout: Duration::from_millis(100),
            ..Default::default()
        };
        let c = client(&[server.addr], config);

        let err = c.link_blob("a/b", &d("layer"), stored(5)).await.unwrap_err();
        assert_eq!(err.status, 503);
        assert!(err.detail.contains("may or may not have been applied"), "{err}");
        assert_eq!(gate.asked(), 1);

        let err = c.blob_link("a/b", &d("layer")).await.unwrap_err();
        assert_eq!(err.status, 503);
        assert!(gate.asked() >= 3, "the read was tried again ({} calls in all)", gate.asked());

        server.stop().await;
        meta.shutdown().await;
    }

    #[tokio::test]
    async fn malformed_requests_are_invalid_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let meta = open(dir.path()).await;
        let server = serve(Arc::new(meta.clone()), Arc::new(AlwaysLeader)).await;
        let mut raw = MetaGrpc::connect(format!("http://{}", server.addr)).await.unwrap();

        let bad_digest = pb::BlobLinkRequest { repo: "a/b".into(), digest: "sha256:nope".into() };
        assert_eq!(raw.blob_link(bad_digest).await.unwrap_err().code(), Code::InvalidArgument);
        let no_blob = pb::LinkBlobRequest { repo: "a/b".into(), digest: d("x").to_string(), blob: None };
        assert_eq!(raw.link_blob(no_blob).await.unwrap_err().code(), Code::InvalidArgument);
        let no_change = pb::ChangeDirectoryRequest { change: None };
        assert_eq!(raw.change_directory(no_change).await.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(meta.blob_link("a/b", &d("x")).await.unwrap(), None, "nothing was linked");

        server.stop().await;
        meta.shutdown().await;
    }
}
