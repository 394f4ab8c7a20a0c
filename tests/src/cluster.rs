//! A cluster of real `berth` processes: a metadata group, storage nodes and frontends.

use std::process::Child;

use crate::meta_group::MetaGroup;
use crate::{spawn_berth_with, Launch, ADMIN, ADMIN_TOKEN};

/// One `berth` role process, killed when dropped.
pub struct RoleProcess {
    child: Child,
    /// The address it printed (`host:port`).
    pub addr: String,
    args: Vec<String>,
    launch: Launch,
}

impl RoleProcess {
    /// Starts `berth ARGS...`.
    pub fn start(args: &[String]) -> RoleProcess {
        Self::start_with(args, Launch::default())
    }

    /// Starts `berth ARGS...` as `launch` says (kept for restarts).
    pub fn start_with(args: &[String], launch: Launch) -> RoleProcess {
        let (child, addr) = spawn_berth_with(&[], args, &launch);
        RoleProcess { child, addr, args: args.to_vec(), launch }
    }

    /// Kills it if it runs, then starts it again with the same arguments, on the address it
    /// had (its data stays where its arguments put it).
    pub fn restart(&mut self) {
        self.kill();
        wait_until_free(&self.addr);
        let mut args = self.args.clone();
        if let Some(i) = args.iter().position(|a| a == "--listen") {
            args[i + 1] = self.addr.clone();
        }
        *self = RoleProcess::start_with(&args, self.launch.clone());
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl RoleProcess {
    /// SIGTERM, as a rolling restart or an upgrade stops it (see [`crate::terminate`]);
    /// whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        crate::terminate(&mut self.child)
    }

    /// SIGKILL, like a power cut of the process.
    pub fn kill(&mut self) {
        // An already exited child is as good as killed.
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three metadata nodes, three storage nodes and two frontends on loopback (each blob on three
/// nodes, a push acknowledged once two have it).
pub struct Cluster {
    /// The metadata group.
    pub meta: MetaGroup,
    /// The storage nodes.
    pub storage: Vec<RoleProcess>,
    /// The frontends.
    pub frontends: Vec<RoleProcess>,
    /// Where the storage nodes keep their data, removed when dropped.
    _dir: tempfile::TempDir,
    /// Flags every storage node gets besides its own.
    storage_extra: Vec<String>,
    /// How its storage nodes and frontends are started (a storage node added later too).
    launch: Launch,
}

/// How a test cluster differs from the default 3/3/2.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Storage nodes.
    pub storage_nodes: usize,
    /// Flags of every metadata node.
    pub meta_args: Vec<String>,
    /// Flags of every storage node.
    pub storage_args: Vec<String>,
    /// Environment and log file of the storage nodes and frontends.
    pub launch: Launch,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions { storage_nodes: 3, meta_args: vec![], storage_args: vec![], launch: Launch::default() }
    }
}

impl Cluster {
    /// Starts the cluster, with the test administrator bootstrapped.
    pub fn start() -> Cluster {
        Self::start_with(ClusterOptions::default())
    }

    /// Starts a cluster as `options` say.
    pub fn start_with(options: ClusterOptions) -> Cluster {
        let dir = tempfile::Builder::new().prefix("berth-cluster-").tempdir().expect("temp dir");
        let meta = MetaGroup::start_with(3, &options.meta_args);
        let n = options.storage_nodes;
        let storage: Vec<RoleProcess> = (0..n)
            .map(|i| {
                let mut args = Self::storage_args(&meta, dir.path(), i, "127.0.0.1:0");
                args.extend(options.storage_args.iter().cloned());
                RoleProcess::start_with(&args, options.launch.clone())
            })
            .collect();
        // The frontends place blobs on the registered storage nodes: wait for all of them.
        wait_for_storage(&meta, n);
        let frontends = (0..2)
            .map(|i| {
                let args = [
                    "frontend".into(),
                    "--listen".into(),
                    "127.0.0.1:0".into(),
                    "--meta".into(),
                    meta.addrs(),
                    "--name".into(),
                    format!("frontend-{i}"),
                    "--bootstrap-admin".into(),
                    format!("{ADMIN}:{ADMIN_TOKEN}"),
                ];
                RoleProcess::start_with(&args, options.launch.clone())
            })
            .collect();
        Cluster { meta, storage, frontends, _dir: dir, storage_extra: options.storage_args, launch: options.launch }
    }

    fn storage_args(meta: &MetaGroup, dir: &std::path::Path, i: usize, listen: &str) -> Vec<String> {
        vec![
            "storage".into(),
            "--listen".into(),
            listen.into(),
            "--meta".into(),
            meta.addrs(),
            "--data-dir".into(),
            dir.join(format!("storage{i}")).display().to_string(),
        ]
    }

    /// Starts one more storage node (it registers itself); returns its index.
    pub fn add_storage(&mut self) -> usize {
        let i = self.storage.len();
        let mut args = Self::storage_args(&self.meta, self._dir.path(), i, "127.0.0.1:0");
        args.extend(self.storage_extra.iter().cloned());
        self.storage.push(RoleProcess::start_with(&args, self.launch.clone()));
        i
    }

    /// The data directory of storage node `i`.
    pub fn storage_dir(&self, i: usize) -> std::path::PathBuf {
        self._dir.path().join(format!("storage{i}"))
    }

    /// SIGKILLs storage node `i`.
    pub fn kill_storage(&mut self, i: usize) {
        self.storage[i].kill();
    }

    /// Stops storage node `i` gracefully (SIGTERM); whether it exited cleanly.
    pub fn stop_storage(&mut self, i: usize) -> bool {
        self.storage[i].stop()
    }

    /// Starts storage node `i` again on its data and address.
    pub fn restart_storage(&mut self, i: usize) {
        self.storage[i].restart();
    }

    /// SIGKILLs every process: frontends, storage nodes, metadata nodes.
    pub fn kill_all(&mut self) {
        self.frontends.iter_mut().chain(self.storage.iter_mut()).for_each(RoleProcess::kill);
        self.meta.nodes.iter_mut().for_each(|n| n.kill());
    }

    /// Starts every process again on its data and address: metadata nodes, storage nodes,
    /// frontends.
    pub fn restart_all(&mut self) {
        self.meta.nodes.iter_mut().for_each(|n| n.restart());
        self.storage.iter_mut().chain(self.frontends.iter_mut()).for_each(RoleProcess::restart);
    }
}

/// Waits (ten seconds at most) until `n` storage nodes have registered with `meta`.
pub fn wait_for_storage(meta: &MetaGroup, n: usize) {
    wait_for_storage_at(&meta.addrs(), &[], n)
}

/// [`wait_for_storage`] asking the metadata nodes at `addrs` (`ADDR,...`), with `flags`
/// (mutual TLS ones, say) before the command.
pub fn wait_for_storage_at(addrs: &str, flags: &[&str], n: usize) {
    let start = std::time::Instant::now();
    let args: Vec<&str> = flags.iter().copied().chain(["storage"]).collect();
    while start.elapsed() < std::time::Duration::from_secs(15) {
        let registered = crate::meta_group::cluster_cli(addrs, &args)
            .ok()
            .and_then(|out| serde_json::from_str::<serde_json::Value>(&out).ok())
            .and_then(|v| v["nodes"].as_array().map(Vec::len))
            .unwrap_or(0);
        if registered >= n {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("fewer than {n} storage nodes registered within 15 s");
}

/// Waits (a few seconds at most) until nothing holds `addr`, a port a killed process had.
fn wait_until_free(addr: &str) {
    for _ in 0..50 {
        if std::net::TcpListener::bind(addr).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A cluster seen as one registry: the API tests' target when they run against a cluster.
pub struct ClusterTarget {
    /// The cluster.
    pub cluster: Cluster,
    /// The URL of the frontend the tests talk to.
    pub url: String,
}

impl ClusterTarget {
    /// Starts a cluster; the tests talk to its second frontend.
    pub fn start() -> ClusterTarget {
        let cluster = Cluster::start();
        let url = cluster.frontends[1].url();
        ClusterTarget { cluster, url }
    }
}

/// Where copies of `blobs` are, against where the current placement map wants them: copies
/// missing at an owner, and copies held by a node that is not an owner. A node that does not
/// answer counts as missing every copy it owns and holding none.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyCensus {
    /// Copies an owner lacks.
    pub missing: usize,
    /// Copies held by non-owners.
    pub extra: usize,
}

/// Counts the copies of `blobs` on every node of the map read from `meta` (`ADDR,...`), with
/// owners as placement gives them for `replicas` copies.
pub async fn copy_census(meta: &str, blobs: &[berth_core::Digest], replicas: usize) -> CopyCensus {
    use berth_core::{BlobStore, MetaStore};
    use berth_storage::client::{StorageClient, StorageClientConfig};
    use berth_storage::placement::Placement;
    let client = berth_meta::client::MetaClient::new(
        meta.split(',').map(String::from).collect(),
        berth_meta::client::MetaClientConfig::default(),
    )
    .expect("meta client");
    let map = client.placement().await.expect("the placement map");
    let placement = Placement::of_map(&map);
    let nodes: Vec<StorageClient> = map
        .nodes
        .iter()
        .map(|n| {
            let config =
                StorageClientConfig { request_timeout: std::time::Duration::from_secs(2), ..Default::default() };
            StorageClient::new(&n.addr, config).expect("storage client")
        })
        .collect();
    let mut census = CopyCensus::default();
    for d in blobs {
        let owners = placement.owners(d, replicas);
        for (i, node) in nodes.iter().enumerate() {
            let holds = matches!(node.stat(d).await, Ok(Some(_)));
            match (owners.contains(&i), holds) {
                (true, false) => census.missing += 1,
                (false, true) => census.extra += 1,
                _ => {}
            }
        }
    }
    census
}

/// Waits (up to `limit`) until every copy of `blobs` is at its owners and nowhere else;
/// returns the last census and how long it took.
pub async fn wait_for_exact_copies(
    meta: &str,
    blobs: &[berth_core::Digest],
    replicas: usize,
    limit: std::time::Duration,
) -> (CopyCensus, std::time::Duration) {
    let start = std::time::Instant::now();
    loop {
        let census = copy_census(meta, blobs, replicas).await;
        if census == CopyCensus::default() || start.elapsed() >= limit {
            return (census, start.elapsed());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
