//! The gRPC contract between Berth's roles, generated from `proto/*.proto`.
//!
//! These files are the only interface between processes: frontends reach storage nodes
//! through [`storage`] and the metadata group through [`meta`]; metadata nodes replicate
//! through [`meta::raft_client`] / [`meta::raft_server`].

pub mod conn;
pub mod status;
pub mod tls;

/// Storage node service: blob bytes and upload staging.
pub mod storage {
    tonic::include_proto!("berth.storage.v1");
}

/// Metadata service and Raft transport.
pub mod meta {
    tonic::include_proto!("berth.meta.v1");
}

/// Forming and changing the metadata group.
pub mod cluster {
    tonic::include_proto!("berth.cluster.v1");
}

/// Puts the current request's trace context and request id in a call's metadata (see
/// [`berth_core::trace`]), so that the role serving it logs and traces under the same ids.
pub fn carry<T>(req: &mut tonic::Request<T>) {
    let metadata = req.metadata_mut();
    berth_core::trace::outgoing(&mut |key, value| {
        if let (Ok(k), Ok(v)) =
            (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), tonic::metadata::MetadataValue::try_from(value))
        {
            metadata.insert(k, v);
        }
    });
}
