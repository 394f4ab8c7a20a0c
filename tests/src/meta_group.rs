//! A metadata group of real `berth meta` processes on loopback: start, SIGKILL, restart,
//! and the group's state as `berth admin cluster status` reports it.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::Lan;
use crate::{berth_bin, spawn_berth_via};

/// One `berth meta` process and how to start it again on its own data.
pub struct MetaNode {
    /// Node id.
    pub id: u64,
    /// gRPC address (fixed across restarts).
    pub addr: String,
    dir: PathBuf,
    child: Option<Child>,
    /// A command prefix it runs under (e.g. `ip netns exec NS`), or none.
    prefix: Vec<String>,
    /// Flags after the ones every node gets.
    extra: Vec<String>,
}

impl MetaNode {
    /// Starts node `id` on `listen` (`127.0.0.1:0` picks a port; a restart reuses the one
    /// bound first) with its data in `dir`.
    pub fn start(id: u64, listen: &str, dir: PathBuf) -> MetaNode {
        Self::start_via(vec![], id, listen, dir)
    }

    /// [`MetaNode::start`] under a command prefix (e.g. `ip netns exec NS`).
    pub fn start_via(prefix: Vec<String>, id: u64, listen: &str, dir: PathBuf) -> MetaNode {
        Self::start_with(prefix, id, listen, dir, vec![])
    }

    /// [`MetaNode::start_via`] with `extra` flags.
    pub fn start_with(prefix: Vec<String>, id: u64, listen: &str, dir: PathBuf, extra: Vec<String>) -> MetaNode {
        let mut n = MetaNode { id, addr: listen.to_string(), dir, child: None, prefix, extra };
        n.spawn();
        n
    }

    fn spawn(&mut self) {
        let args = ["meta", "--id", &self.id.to_string(), "--listen", &self.addr, "--data-dir"].map(String::from);
        let mut args = args.to_vec();
        args.push(self.dir.display().to_string());
        args.extend(self.extra.iter().cloned());
        let (child, addr) = spawn_berth_via(&self.prefix, &args);
        self.addr = addr;
        self.child = Some(child);
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, like a power cut of the process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // An already exited child is as good as killed.
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// Starts it again on its data and address.
    pub fn restart(&mut self) {
        self.kill();
        // The port was ours a moment ago; give the kernel a moment if it is still held.
        for _ in 0..50 {
            if std::net::TcpListener::bind(&self.addr).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.spawn();
    }

    /// Whether it runs.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for MetaNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `berth admin cluster --meta NODES ARGS...`; returns its stdout, or its stderr as Err.
pub fn cluster_cli(nodes: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(berth_bin())
        .args(["admin", "cluster", "--meta", nodes])
        .args(args)
        .output()
        .expect("running berth admin cluster");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A group of metadata nodes.
pub struct MetaGroup {
    /// The nodes, index = id - 1.
    pub nodes: Vec<MetaNode>,
    _dir: tempfile::TempDir,
}

impl MetaGroup {
    /// Starts `n` nodes and forms the group.
    pub fn start(n: u64) -> MetaGroup {
        Self::start_with(n, &[])
    }

    /// Starts `n` nodes with `extra` flags each and forms the group.
    pub fn start_with(n: u64, extra: &[String]) -> MetaGroup {
        Self::start_each(n, |_| extra.to_vec())
    }

    /// Starts `n` nodes, node `id` with the flags `extra(id)`, and forms the group.
    pub fn start_each(n: u64, extra: impl Fn(u64) -> Vec<String>) -> MetaGroup {
        let dir = tempfile::Builder::new().prefix("berth-meta-group-").tempdir().expect("temp dir");
        let nodes: Vec<MetaNode> = (1..=n)
            .map(|id| MetaNode::start_with(vec![], id, "127.0.0.1:0", dir.path().join(format!("meta{id}")), extra(id)))
            .collect();
        Self::form(nodes, dir)
    }

    /// One node on each host of `lan` (node id = host number), and the group formed.
    pub fn start_on(lan: &Lan) -> MetaGroup {
        let dir = tempfile::Builder::new().prefix("berth-meta-group-").tempdir().expect("temp dir");
        let nodes: Vec<MetaNode> = (1..=lan.addrs.len())
            .map(|i| {
                let listen = format!("{}:7100", lan.addrs[i - 1]);
                MetaNode::start_via(lan.exec_prefix(i), i as u64, &listen, dir.path().join(format!("meta{i}")))
            })
            .collect();
        Self::form(nodes, dir)
    }

    fn form(nodes: Vec<MetaNode>, dir: tempfile::TempDir) -> MetaGroup {
        let members: Vec<String> = nodes.iter().map(|m| format!("{}={}", m.id, m.addr)).collect();
        cluster_cli(&members.join(","), &["init"]).expect("cluster init");
        let g = MetaGroup { nodes, _dir: dir };
        g.wait_for_leader(Duration::from_secs(10)).expect("a leader after init");
        g
    }

    /// The addresses of every node, comma-separated.
    pub fn addrs(&self) -> String {
        self.nodes.iter().map(|m| m.addr.clone()).collect::<Vec<_>>().join(",")
    }

    /// Each running node's status.
    pub fn status(&self) -> Vec<Value> {
        let running: Vec<String> = self.nodes.iter().filter(|n| n.running()).map(|n| n.addr.clone()).collect();
        match cluster_cli(&running.join(","), &["status", "--meta-only"]) {
            Ok(out) => {
                serde_json::from_str::<Value>(&out).ok().and_then(|v| v["meta"].as_array().cloned()).unwrap_or_default()
            }
            Err(_) => vec![],
        }
    }

    /// The id of the node that a running node reports as leader and that itself says it leads.
    pub fn leader(&self) -> Option<u64> {
        let status = self.status();
        status.iter().find(|s| s["state"] == "leader").and_then(|s| s["id"].as_u64())
    }

    /// Waits until some running node leads.
    pub fn wait_for_leader(&self, limit: Duration) -> Option<u64> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(l) = self.leader() {
                return Some(l);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}
