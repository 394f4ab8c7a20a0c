//! A small cluster of real `berth` processes: a metadata group, a storage node and frontends.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use crate::meta_group::MetaGroup;
use crate::{berth_bin, ADMIN, ADMIN_TOKEN};

/// One `berth` role process, killed when dropped.
pub struct RoleProcess {
    child: Child,
    /// The address it printed (`host:port`).
    pub addr: String,
}

impl RoleProcess {
    /// Starts `berth ARGS...` and reads the address from its first line (`http://` or `grpc://`).
    pub fn start(args: &[String]) -> RoleProcess {
        let mut child = Command::new(berth_bin())
            .args(args)
            .env("BERTH_LOG", std::env::var("BERTH_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting berth");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = lines.next().expect("berth printed nothing").expect("reading its stdout");
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http://").or_else(|| w.strip_prefix("grpc://")))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        std::thread::spawn(move || for _ in lines {});
        RoleProcess { child, addr }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        // An already exited child is as good as killed.
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// Three metadata nodes, one storage node and two frontends on loopback.
pub struct Cluster {
    /// The metadata group.
    pub meta: MetaGroup,
    /// The storage node.
    pub storage: RoleProcess,
    /// The frontends.
    pub frontends: Vec<RoleProcess>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts the cluster, with the test administrator bootstrapped.
    pub fn start(extra_storage: &[&str]) -> Cluster {
        let dir = tempfile::Builder::new().prefix("berth-cluster-").tempdir().expect("temp dir");
        let meta = MetaGroup::start(3);
        let addrs = meta.addrs();
        let mut args: Vec<String> = ["storage", "--listen", "127.0.0.1:0", "--meta", &addrs, "--data-dir"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(dir.path().join("storage").display().to_string());
        args.extend(extra_storage.iter().map(|s| s.to_string()));
        let storage = RoleProcess::start(&args);
        let frontends = (0..2)
            .map(|i| {
                RoleProcess::start(&[
                    "frontend".into(),
                    "--listen".into(),
                    "127.0.0.1:0".into(),
                    "--meta".into(),
                    addrs.clone(),
                    "--storage".into(),
                    storage.addr.clone(),
                    "--name".into(),
                    format!("frontend-{i}"),
                    "--bootstrap-admin".into(),
                    format!("{ADMIN}:{ADMIN_TOKEN}"),
                ])
            })
            .collect();
        Cluster { meta, storage, frontends, _dir: dir }
    }
}
