//! A cluster of real `berth` processes: a metadata group, storage nodes and frontends.

use std::process::Child;

use crate::meta_group::MetaGroup;
use crate::{spawn_berth, ADMIN, ADMIN_TOKEN};

/// One `berth` role process, killed when dropped.
pub struct RoleProcess {
    child: Child,
    /// The address it printed (`host:port`).
    pub addr: String,
}

impl RoleProcess {
    /// Starts `berth ARGS...`.
    pub fn start(args: &[String]) -> RoleProcess {
        let (child, addr) = spawn_berth(args);
        RoleProcess { child, addr }
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
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts the cluster, with the test administrator bootstrapped.
    pub fn start() -> Cluster {
        let dir = tempfile::Builder::new().prefix("berth-cluster-").tempdir().expect("temp dir");
        let meta = MetaGroup::start(3);
        let storage: Vec<RoleProcess> =
            (0..3).map(|i| RoleProcess::start(&Self::storage_args(&meta, dir.path(), i, "127.0.0.1:0"))).collect();
        let storage_addrs = storage.iter().map(|s| s.addr.clone()).collect::<Vec<_>>().join(",");
        let frontends = (0..2)
            .map(|i| {
                RoleProcess::start(&[
                    "frontend".into(),
                    "--listen".into(),
                    "127.0.0.1:0".into(),
                    "--meta".into(),
                    meta.addrs(),
                    "--storage".into(),
                    storage_addrs.clone(),
                    "--name".into(),
                    format!("frontend-{i}"),
                    "--bootstrap-admin".into(),
                    format!("{ADMIN}:{ADMIN_TOKEN}"),
                ])
            })
            .collect();
        Cluster { meta, storage, frontends, dir }
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

    /// SIGKILLs storage node `i`.
    pub fn kill_storage(&mut self, i: usize) {
        self.storage[i].kill();
    }

    /// Starts storage node `i` again on its data and address.
    pub fn restart_storage(&mut self, i: usize) {
        let addr = self.storage[i].addr.clone();
        for _ in 0..50 {
            if std::net::TcpListener::bind(&addr).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        self.storage[i] = RoleProcess::start(&Self::storage_args(&self.meta, self.dir.path(), i, &addr));
    }
}
