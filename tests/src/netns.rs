//! Hosts of their own on this machine: network namespaces on a private bridge, each with an
//! address, and the means to cut one off from chosen others (iptables inside its namespace).
//! Needs root and iproute2/iptables; [`Lan::create`] says `None` when they are not at hand.

use std::process::Command;

/// A bridge with `n` namespaces on it. Everything is removed when dropped.
pub struct Lan {
    bridge: String,
    prefix: String,
    /// Namespace names, index = host number - 1.
    pub spaces: Vec<String>,
    /// Each namespace's address.
    pub addrs: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

impl Lan {
    /// `n` namespaces on a new bridge, or `None` (with the reason printed) where namespaces
    /// cannot be made: not root, or no iproute2.
    pub fn create(n: usize) -> Option<Lan> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: network namespaces need root");
            return None;
        }
        let id = std::process::id() % 100_000;
        // A /24 of its own per test process, so concurrent runs do not meet.
        let net = format!("10.231.{}", id % 250 + 1);
        let mut lan = Lan {
            bridge: format!("bb{id}"),
            prefix: format!("berth{id}-"),
            spaces: vec![],
            addrs: (1..=n).map(|i| format!("{net}.{}", 10 + i)).collect(),
        };
        match lan.build(n, &net) {
            Ok(()) => Some(lan),
            Err(e) if crate::in_ci() => panic!("network namespaces: {e}"),
            Err(e) => {
                eprintln!("skipping: network namespaces: {e}");
                None
            }
        }
    }

    fn build(&mut self, n: usize, net: &str) -> Result<(), String> {
        let br = self.bridge.clone();
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{net}.1/24"), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
        // Where bridged traffic passes the host's firewall (Docker's FORWARD policy drops it),
        // let this bridge's own traffic through.
        run("iptables", &["-I", "FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT"]).ok();
        for i in 1..=n {
            let ns = format!("{}{i}", self.prefix);
            ip(&["netns", "add", &ns])?;
            self.spaces.push(ns.clone());
            let outside = format!("{br}v{i}");
            ip(&["link", "add", &outside, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["link", "set", &outside, "master", &br])?;
            ip(&["link", "set", &outside, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", self.addrs[i - 1]), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// The command prefix that runs a program in host `i`'s namespace (1-based).
    pub fn exec_prefix(&self, i: usize) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.spaces[i - 1].clone()]
    }

    /// Cuts host `i` off from hosts `others` (both directions); everything else still reaches it.
    pub fn cut(&self, i: usize, others: &[usize]) {
        for o in others {
            let peer = &self.addrs[o - 1];
            for rule in [["-A", "INPUT", "-s", peer, "-j", "DROP"], ["-A", "OUTPUT", "-d", peer, "-j", "DROP"]] {
                let mut args = vec!["netns", "exec", &self.spaces[i - 1], "iptables"];
                args.extend(rule);
                ip(&args).expect("iptables in the namespace");
            }
        }
    }

    /// Undoes every cut of host `i`.
    pub fn heal(&self, i: usize) {
        for chain in ["INPUT", "OUTPUT"] {
            ip(&["netns", "exec", &self.spaces[i - 1], "iptables", "-F", chain]).expect("iptables -F");
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in &self.spaces {
            ip(&["netns", "del", ns]).ok();
        }
        run("iptables", &["-D", "FORWARD", "-i", &self.bridge, "-o", &self.bridge, "-j", "ACCEPT"]).ok();
        ip(&["link", "del", &self.bridge]).ok();
    }
}
