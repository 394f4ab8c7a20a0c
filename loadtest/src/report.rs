//! Latency recording (HDR histograms per request kind) and the report: a table and JSON.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Collects latencies by request kind; cheap to clone and share between workers.
#[derive(Clone, Default)]
pub struct Recorder {
    hists: Arc<Mutex<BTreeMap<&'static str, Histogram<u64>>>>,
}

impl Recorder {
    /// Records one request of `kind` that took `d`.
    pub fn record(&self, kind: &'static str, d: Duration) {
        if let Ok(mut h) = self.hists.lock() {
            let hist = h.entry(kind).or_insert_with(|| {
                Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| Histogram::new(3).expect("histogram"))
            });
            let _ = hist.record((d.as_micros() as u64).max(1));
        }
    }

    /// Percentiles by kind.
    pub fn latencies(&self) -> BTreeMap<String, Latency> {
        let h = self.hists.lock().map(|h| h.clone()).unwrap_or_default();
        h.into_iter().map(|(k, v)| (k.to_string(), Latency::of(&v))).collect()
    }
}

/// Latency percentiles of one request kind, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Requests recorded.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

/// The outcome of one scenario against one registry.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Registry URL.
    pub target: String,
    /// Scenario name.
    pub scenario: String,
    /// Wall time of the measured part, seconds.
    pub seconds: f64,
    /// Headline rates (e.g. `MB/s`, `images/s`, `rps`).
    pub rates: BTreeMap<String, f64>,
    /// Latency percentiles by request kind.
    pub latencies: BTreeMap<String, Latency>,
    /// Operations that failed.
    pub errors: u64,
    /// Peak RSS of the registry process during the run, when its pid was given; of a
    /// registry of several processes, the sum of their peaks (MiB).
    pub peak_rss_mib: Option<f64>,
    /// CPU milliseconds the registry's processes spent per unit counted (`images`, `blobs`,
    /// `MB`, `requests`...) in the timed parts, when their pids were given (see `crate::cpu`).
    pub server_cpu_ms: BTreeMap<String, f64>,
    /// CPU milliseconds this tool spent per unit counted in the timed parts: the client's
    /// share of the machine.
    pub client_cpu_ms: BTreeMap<String, f64>,
    /// Share of all CPUs' time in the timed parts that was idle, in percent (see
    /// `crate::cpu::Machine`).
    pub machine_idle_pct: Option<f64>,
    /// Share of all CPUs' time in the timed parts stolen by the hypervisor, in percent.
    pub machine_steal_pct: Option<f64>,
}

/// The unit a scenario's CPU time is shown per in the table: its first count of these.
const CPU_UNITS: [(&str, &str); 4] =
    [("images", "image"), ("requests", "request"), ("operations", "operation"), ("MB", "MB")];

/// Prints outcomes as a table; with two, adds the ratio first ÷ second.
pub fn print_table(outcomes: &[Outcome]) {
    let Some(first) = outcomes.first() else {
        return;
    };
    println!("\n== {} ==", first.scenario);
    let names: Vec<&str> = outcomes.iter().map(|o| o.target.as_str()).collect();
    print!("{:<32}", "metric");
    for n in &names {
        print!("{:>26}", shorten(n));
    }
    if outcomes.len() == 2 {
        print!("{:>10}", "ratio");
    }
    println!();
    let mut rows: Vec<(String, Vec<Option<f64>>)> = vec![];
    for key in first.rates.keys() {
        rows.push((key.clone(), outcomes.iter().map(|o| o.rates.get(key).copied()).collect()));
    }
    for kind in first.latencies.keys() {
        for (label, pick) in [("p50 ms", 0), ("p90 ms", 1), ("p99 ms", 2), ("max ms", 3)] {
            let vals = outcomes
                .iter()
                .map(|o| {
                    o.latencies.get(kind).map(|l| match pick {
                        0 => l.p50_ms,
                        1 => l.p90_ms,
                        2 => l.p99_ms,
                        _ => l.max_ms,
                    })
                })
                .collect();
            rows.push((format!("{kind} {label}"), vals));
        }
    }
    rows.push(("errors".into(), outcomes.iter().map(|o| Some(o.errors as f64)).collect()));
    if let Some((unit, one)) = CPU_UNITS.iter().find(|(u, _)| outcomes.iter().any(|o| o.client_cpu_ms.contains_key(*u)))
    {
        let server = outcomes.iter().map(|o| o.server_cpu_ms.get(*unit).copied()).collect();
        rows.push((format!("server CPU ms/{one}"), server));
        rows.push((
            format!("client CPU ms/{one}"),
            outcomes.iter().map(|o| o.client_cpu_ms.get(*unit).copied()).collect(),
        ));
    }
    rows.push(("peak RSS MiB".into(), outcomes.iter().map(|o| o.peak_rss_mib).collect()));
    rows.push(("machine idle %".into(), outcomes.iter().map(|o| o.machine_idle_pct).collect()));
    rows.push(("machine steal %".into(), outcomes.iter().map(|o| o.machine_steal_pct).collect()));
    for (label, vals) in rows {
        print!("{label:<32}");
        for v in &vals {
            match v {
                Some(v) => print!("{v:>26.2}"),
                None => print!("{:>26}", "-"),
            }
        }
        if let [Some(a), Some(b)] = vals.as_slice() {
            if *b != 0.0 {
                print!("{:>10.2}", a / b);
            }
        }
        println!();
    }
}

fn shorten(s: &str) -> String {
    let s = s.trim_start_matches("http://");
    if s.len() > 24 {
        s[s.len() - 24..].to_string()
    } else {
        s.to_string()
    }
}

/// The peak RSS (`VmHWM`) of processes `pids` in MiB, summed; `None` when there are none or
/// one cannot be read.
pub fn peak_rss_mib(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&pid| one_peak_rss_mib(pid)).sum()
}

fn one_peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}
