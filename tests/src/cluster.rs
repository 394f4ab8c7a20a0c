//! A cluster of real `berth` processes: a metadata group, storage nodes and frontends.

use std::process::Child;

use crate::meta_group::MetaGroup;
use crate::{spawn_berth, ADMIN, ADMIN_TOKEN};

/// One `berth` role process, killed when dropped.
pub struct RoleProcess {
    child: Child,
    /// The address it printed (`host:port`).
    pub addr: String,
    args: Vec<String>,
}

impl RoleProcess {
    /// Starts `berth ARGS...`.
    pub fn start(args: &[String]) -> RoleProcess {
        let (child, addr) = spawn_berth(args);
        RoleProcess { child, addr, args: args.to_vec() }
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
        *self = RoleProcess::start(&args);
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl RoleProcess {
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
}

impl Cluster {
    /// Starts the cluster, with the test administrator bootstrapped.
    pub fn start() -> Cluster {
        let dir = tempfile::Builder::new().prefix("berth-cluster-").tempdir().expect("temp dir");
        let meta = MetaGroup::start(3);
        let storage: Vec<RoleProcess> =
            (0..3).map(|i| RoleProcess::start(&Self::storage_args(&meta, dir.path(), i, "127.0.0.1:0"))).collect();
        // The frontends place blobs on the registered storage nodes: wait for all three.
        wait_for_storage(&meta, 3);
        let frontends = (0..2)
            .map(|i| {
                RoleProcess::start(&[
                    "frontend".into(),
                    "--listen".into(),
                    "127.0.0.1:0".into(),
                    "--meta".into(),
                    meta.addrs(),
                    "--name".into(),
                    format!("frontend-{i}"),
                    "--bootstrap-admin".into(),
                    format!("{ADMIN}:{ADMIN_TOKEN}"),
                ])
            })
            .collect();
        Cluster { meta, storage, frontends, _dir: dir }
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
        self.storage.push(RoleProcess::start(&Self::storage_args(&self.meta, self._dir.path(), i, "127.0.0.1:0")));
        i
    }

    /// SIGKILLs storage node `i`.
    pub fn kill_storage(&mut self, i: usize) {
        self.storage[i].kill();
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
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(10) {
        let registered = crate::meta_group::cluster_cli(&meta.addrs(), &["storage"])
            .ok()
            .and_then(|out| serde_json::from_str::<serde_json::Value>(&out).ok())
            .and_then(|v| v["nodes"].as_array().map(Vec::len))
            .unwrap_or(0);
        if registered >= n {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("fewer than {n} storage nodes registered within 10 s");
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
