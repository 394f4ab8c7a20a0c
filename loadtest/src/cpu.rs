//! CPU time spent during a scenario's timed parts: by the registry's processes (their pids,
//! read from `/proc`, so Linux only) and by this tool itself.
//!
//! Throughput on a shared machine drifts by ±15% from run to run; the CPU time a registry
//! spends per image pushed or pulled drifts far less, and it says how much of the machine each
//! operation takes. What is counted is the processes' own time (all their threads) while the
//! clock runs: work a registry leaves to the kernel's threads (writing back the pages of a
//! registry that does not fsync) or finishes after the timed part ends is not counted, so the
//! figure favours a registry that defers work. The other way round, work a registry defers
//! from a scenario's setup (the pushes a pull scenario makes first) and does during the timed
//! part is counted. The client's figure is whatever this tool does in the timed part, which
//! differs between scenarios (`mixed` generates its images as it goes).

use std::sync::Mutex;

/// CPU seconds spent in timed parts so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spent {
    /// By the registry's processes; `None` when no pid was given or one could not be read at
    /// a mark (a process that exited, a system without `/proc`).
    pub server: Option<f64>,
    /// By this process (every scenario's client work, all its threads).
    pub client: f64,
    /// The whole machine's time, all CPUs; `None` when `/proc/stat` could not be read.
    pub machine: Option<Machine>,
}

impl Default for Spent {
    /// Nothing spent yet, the server's and the machine's time included.
    fn default() -> Spent {
        Spent { server: Some(0.0), client: 0.0, machine: Some(Machine::default()) }
    }
}

impl Spent {
    /// The sum of two rounds' figures; a round without the server's (or the machine's)
    /// leaves it unknown.
    pub fn add(self, other: Spent) -> Spent {
        Spent {
            server: self.server.zip(other.server).map(|(a, b)| a + b),
            client: self.client + other.client,
            machine: self.machine.zip(other.machine).map(|(a, b)| a.add(b)),
        }
    }
}

/// The whole machine's CPU time, all CPUs together, in clock ticks (the `cpu` line of
/// `/proc/stat`). It tells whether a registry had the machine to itself and used all of it:
/// a registry that leaves CPUs idle while the clock runs waits on something else (the disk,
/// its own latency), one that leaves none is bound by the CPUs, and time the hypervisor gave
/// to other guests (steal) is time no process here had; on shared virtual machines it comes
/// and goes, and it slows a CPU-bound registry more than one that mostly waits.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Machine {
    /// Idle, waiting for I/O included.
    pub idle: u64,
    /// Stolen by the hypervisor.
    pub steal: u64,
    /// Everything: user, nice, system, idle, iowait, irq, softirq and steal.
    pub total: u64,
}

impl Machine {
    fn add(self, o: Machine) -> Machine {
        Machine { idle: self.idle + o.idle, steal: self.steal + o.steal, total: self.total + o.total }
    }

    fn since(self, then: Machine) -> Machine {
        Machine {
            idle: self.idle.saturating_sub(then.idle),
            steal: self.steal.saturating_sub(then.steal),
            total: self.total.saturating_sub(then.total),
        }
    }

    /// Shares of the time counted that was idle and stolen, in percent; `None` when none
    /// was counted.
    pub fn idle_and_steal_pct(self) -> Option<(f64, f64)> {
        (self.total > 0).then(|| {
            let pct = |n: u64| 100.0 * n as f64 / self.total as f64;
            (pct(self.idle), pct(self.steal))
        })
    }
}

/// The machine's CPU time so far, from `/proc/stat`.
fn machine_ticks() -> Option<Machine> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The `cpu` line of `/proc/stat`: user nice system idle iowait irq softirq steal (guest time
/// is already in user and nice).
fn parse_proc_stat(text: &str) -> Option<Machine> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line.split_whitespace().skip(1).take(8).map(|v| v.parse().ok()).collect::<Option<_>>()?;
    if f.len() < 8 {
        return None;
    }
    Some(Machine { idle: f[3] + f[4], steal: f[7], total: f.iter().sum() })
}

/// Meters the CPU time of the registry processes `pids` and of this process between the
/// `begin` and `end` marks of each timed part.
#[derive(Debug)]
pub struct Meter {
    pids: Vec<u32>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The reading at the last `begin`, until its `end`.
    begun: Option<Spent>,
    /// What the timed parts since the last `take` spent.
    spent: Spent,
    /// Whether an unreadable pid was reported.
    warned: bool,
}

impl Meter {
    /// A meter of `pids` (none: only this process's time is known).
    pub fn new(pids: Vec<u32>) -> Meter {
        Meter { pids, state: Mutex::new(State { begun: None, spent: Spent::default(), warned: false }) }
    }

    /// The processes metered.
    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    fn read(&self) -> Spent {
        let mut server = Some(0.0);
        for &pid in &self.pids {
            let cpu = process_cpu_seconds(pid);
            if cpu.is_none() {
                self.warn_once(pid);
            }
            server = server.zip(cpu).map(|(a, b)| a + b);
        }
        Spent { server: server.filter(|_| !self.pids.is_empty()), client: own_cpu_seconds(), machine: machine_ticks() }
    }

    /// Says once on stderr that pid `pid` could not be read: the report then gives no server
    /// CPU time, as when no pid was given, and this tells the two apart.
    fn warn_once(&self, pid: u32) {
        if let Ok(mut s) = self.state.lock() {
            if !std::mem::replace(&mut s.warned, true) {
                eprintln!("warning: cannot read the CPU time of pid {pid} (exited?); no server CPU time is reported");
            }
        }
    }

    /// A timed part starts.
    pub fn begin(&self) {
        let now = self.read();
        if let Ok(mut s) = self.state.lock() {
            s.begun = Some(now);
        }
    }

    /// The timed part begun last ends: what it spent is added up.
    pub fn end(&self) {
        let now = self.read();
        if let Ok(mut s) = self.state.lock() {
            if let Some(then) = s.begun.take() {
                let part = Spent {
                    server: now.server.zip(then.server).map(|(n, t)| (n - t).max(0.0)),
                    client: (now.client - then.client).max(0.0),
                    machine: now.machine.zip(then.machine).map(|(n, t)| n.since(t)),
                };
                s.spent = s.spent.add(part);
            }
        }
    }

    /// What the timed parts spent since the last call, which starts the count again.
    pub fn take(&self) -> Spent {
        match self.state.lock() {
            Ok(mut s) => {
                s.begun = None;
                std::mem::take(&mut s.spent)
            }
            Err(_) => Spent { server: None, client: 0.0, machine: None },
        }
    }
}

/// User plus system CPU seconds of process `pid` (all its threads, live and exited), from
/// `/proc/PID/stat`.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_cpu_seconds(&stat, clock_ticks())
}

/// The CPU seconds in a `/proc/PID/stat` line: utime and stime, the 14th and 15th fields.
/// The command name (2nd field, in parentheses) may hold spaces and parentheses, so fields
/// are counted from the last `)`.
fn stat_cpu_seconds(stat: &str, ticks_per_second: f64) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_second)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads its integer argument.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// User plus system CPU seconds of this process so far.
fn own_cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the pointer it is given, which is valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
        return 0.0;
    }
    // SAFETY: getrusage succeeded, so it filled the struct (and zeroed is a valid rusage).
    let u = unsafe { usage.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_user_plus_system_time() {
        // The name holds a space and a parenthesis; utime 250 and stime 50 ticks.
        let line = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 9 0 100 0 0";
        assert_eq!(stat_cpu_seconds(line, 100.0), Some(3.0));
        assert_eq!(stat_cpu_seconds("4242 (cut short) S 1 2", 100.0), None);
    }

    #[test]
    fn the_machine_line_gives_idle_steal_and_total_ticks() {
        let text = "cpu  100 5 50 800 40 0 5 20 7 0\ncpu0 50 2 25 400 20 0 2 10 3 0\nintr 1 2\n";
        let m = parse_proc_stat(text).unwrap();
        assert_eq!(m, Machine { idle: 840, steal: 20, total: 1020 });
        let later = Machine { idle: 890, steal: 30, total: 1220 };
        let (idle, steal) = later.since(m).idle_and_steal_pct().unwrap();
        assert_eq!((idle, steal), (25.0, 5.0));
        assert_eq!(Machine::default().idle_and_steal_pct(), None);
        assert_eq!(parse_proc_stat("cpu  1 2 3\n"), None, "a short line");
        assert_eq!(parse_proc_stat("intr 1 2\n"), None);
    }

    #[test]
    fn this_process_is_metered_and_a_missing_one_makes_the_server_unknown() {
        let me = std::process::id();
        let meter = Meter::new(vec![me]);
        meter.begin();
        // Some CPU work between the marks.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        meter.end();
        let spent = meter.take();
        assert!(spent.server.is_some_and(|s| s >= 0.0), "{spent:?}");
        assert!(spent.client > 0.0, "{spent:?}");
        assert!(spent.machine.is_some_and(|m| m.total > 0 || cfg!(not(target_os = "linux"))), "{spent:?}");
        assert_eq!(meter.take(), Spent::default(), "take starts the count again");

        // No pid: the server's time is unknown; an unreadable pid makes it unknown too.
        for pids in [vec![], vec![me, u32::MAX]] {
            let meter = Meter::new(pids);
            meter.begin();
            meter.end();
            assert_eq!(meter.take().server, None);
        }
    }
}
