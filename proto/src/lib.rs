//! The gRPC contract between Berth's roles, generated from `proto/*.proto`.
//!
//! These files are the only interface between processes: frontends reach storage nodes
//! through [`storage`] and the metadata group through [`meta`]; metadata nodes replicate
//! through [`meta::raft_client`] / [`meta::raft_server`].

pub mod status;

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
