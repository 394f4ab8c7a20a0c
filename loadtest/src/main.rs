//! `berth-loadtest`: bounded, reproducible load scenarios against any OCI registry, with an
//! optional side-by-side comparison against a second one, reported as a table and as JSON.

mod client;
mod cpu;
mod limits;
mod report;
mod scenarios;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use client::{Credentials, Registry};
use report::{Outcome, Recorder};
use scenarios::{Params, Work};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// One big blob pushed in one streamed PATCH.
    PushLarge,
    /// One big blob pushed in PATCHes of --chunk-size.
    PushChunked,
    /// One big blob pulled (pushed first).
    PullLarge,
    /// W workers push N distinct images.
    PushImages,
    /// W workers pull N images back, verifying digests (pushed first).
    PullImages,
    /// W workers GET a manifest by tag for D seconds.
    ManifestGet,
    /// W workers push and pull images at --push-ratio for D seconds.
    Mixed,
    /// Every scenario above, in turn.
    All,
    /// This machine's limits: one core's SHA-256 rate, loopback bandwidth, fsync'd disk writes,
    /// writing freshly mapped memory.
    Limits,
}

/// Load scenarios against an OCI registry.
#[derive(Parser, Debug)]
#[command(name = "berth-loadtest", version, about)]
struct Cli {
    /// What to run.
    #[arg(value_enum)]
    scenario: Scenario,
    /// The registry under test; several base URLs separated by commas (a cluster's frontends)
    /// share the load: each worker keeps to one of them (worker k to URL k mod n), as a
    /// client's connections do behind a load balancer, so give at least as many workers as
    /// URLs; the one-blob scenarios send their requests to them in turn (the chunks of one
    /// upload go through every frontend).
    #[arg(long, default_value = "http://127.0.0.1:5000")]
    url: String,
    /// PEM file of the certificate authorities to trust for HTTPS URLs (besides the system's),
    /// e.g. the one that signed a registry's self-signed certificate.
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    /// User name for the registry (Docker token auth or Basic).
    #[arg(long, env = "LOADTEST_USERNAME")]
    username: Option<String>,
    /// Password or token for the registry.
    #[arg(long, env = "LOADTEST_TOKEN")]
    token: Option<String>,
    /// pid of the registry under test, or the pids of its processes separated by commas (a
    /// cluster's): the report gives the CPU time they spend per operation in the timed parts
    /// and their peak RSS (summed over the processes).
    #[arg(long, value_delimiter = ',')]
    pid: Vec<u32>,
    /// A second registry to run the same scenario against, interleaved; the report gives
    /// both and the ratio first ÷ second.
    #[arg(long)]
    compare: Option<String>,
    /// User name for the second registry.
    #[arg(long)]
    compare_username: Option<String>,
    /// Password or token for the second registry.
    #[arg(long)]
    compare_token: Option<String>,
    /// pid(s) of the second registry, as --pid.
    #[arg(long, value_delimiter = ',')]
    compare_pid: Vec<u32>,
    /// Rounds per registry; with --compare they alternate A B B A ... to cancel drift.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Size of the large blob, bytes.
    #[arg(long, default_value_t = 512 << 20)]
    size: u64,
    /// PATCH size for push-chunked, bytes.
    #[arg(long, default_value_t = 16 << 20)]
    chunk_size: u64,
    /// Images to push or pull.
    #[arg(long, default_value_t = 400)]
    images: usize,
    /// Concurrent workers.
    #[arg(long, default_value_t = 32)]
    workers: usize,
    /// Layers per image.
    #[arg(long, default_value_t = 3)]
    layers: usize,
    /// Bytes per layer.
    #[arg(long, default_value_t = 256 << 10)]
    layer_size: usize,
    /// Bytes of an image's config.
    #[arg(long, default_value_t = 1024)]
    config_size: usize,
    /// Seconds of timed scenarios (manifest-get, mixed).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Share of pushes in `mixed`.
    #[arg(long, default_value_t = 0.2)]
    push_ratio: f64,
    /// Repository prefix (each run adds a random suffix).
    #[arg(long, default_value = "loadtest")]
    repo: String,
    /// Seed of generated content.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Hard bound on one scenario's run against one registry, seconds.
    #[arg(long, default_value_t = 600)]
    max_seconds: u64,
    /// Hash the blob pulled by pull-large (caps the rate at one client core's SHA-256 speed).
    #[arg(long)]
    verify_large: bool,
    /// A shell command run with `begin` right before each timed part of a scenario and with
    /// `end` right after it, waited for each time: what the command measures then leaves out
    /// the scenario's setup (the pushes a pull scenario makes first).
    #[arg(long)]
    measure_hook: Option<String>,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Directory for the disk measurement of `limits`.
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

struct Target {
    registry: Registry,
    recorder: Recorder,
    /// The CPU time (and, through its pids, the peak RSS) of the registry's processes.
    meter: Arc<cpu::Meter>,
    work: Vec<Work>,
}

const ALL: [Scenario; 7] = [
    Scenario::PushLarge,
    Scenario::PushChunked,
    Scenario::PullLarge,
    Scenario::PushImages,
    Scenario::PullImages,
    Scenario::ManifestGet,
    Scenario::Mixed,
];

fn name(s: Scenario) -> String {
    s.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.scenario == Scenario::Limits {
        let l = limits::measure(&cli.dir).await?;
        limits::print(&l);
        if let Some(path) = &cli.json {
            std::fs::write(path, serde_json::to_vec_pretty(&l)?)?;
        }
        return Ok(());
    }
    let list: Vec<Scenario> = if cli.scenario == Scenario::All { ALL.to_vec() } else { vec![cli.scenario] };
    let run_id: u32 = rand::random::<u32>() % 1_000_000;
    let mut report = vec![];
    for s in list {
        let outcomes = run_scenario(&cli, s, run_id).await?;
        report::print_table(&outcomes);
        report.push(outcomes);
    }
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn run_scenario(cli: &Cli, scenario: Scenario, run_id: u32) -> Result<Vec<Outcome>> {
    let params = Params {
        size: cli.size,
        chunk_size: cli.chunk_size.max(1),
        images: cli.images,
        workers: cli.workers,
        layers: cli.layers,
        layer_size: cli.layer_size,
        config_size: cli.config_size,
        duration: Duration::from_secs(cli.duration),
        push_ratio: cli.push_ratio,
        repo: format!("{}/{}{run_id}", cli.repo, name(scenario)),
        seed: cli.seed ^ run_id as u64,
        verify_large: cli.verify_large,
        measure_hook: cli.measure_hook.clone(),
        meter: Arc::new(cpu::Meter::new(vec![])),
    };
    let mut targets = vec![Target {
        registry: Registry::new(
            &cli.url,
            Credentials { username: cli.username.clone(), token: cli.token.clone() },
            cli.ca.as_deref(),
        )?,
        recorder: Recorder::default(),
        meter: Arc::new(cpu::Meter::new(cli.pid.clone())),
        work: vec![],
    }];
    if let Some(url) = &cli.compare {
        targets.push(Target {
            registry: Registry::new(
                url,
                Credentials { username: cli.compare_username.clone(), token: cli.compare_token.clone() },
                cli.ca.as_deref(),
            )?,
            recorder: Recorder::default(),
            meter: Arc::new(cpu::Meter::new(cli.compare_pid.clone())),
            work: vec![],
        });
    }
    // A B B A A B ...: each registry runs first as often as second.
    let mut order = vec![];
    for r in 0..cli.rounds.max(1) {
        let mut pair: Vec<usize> = (0..targets.len()).collect();
        if r % 2 == 1 {
            pair.reverse();
        }
        order.extend(pair.into_iter().map(|t| (r, t)));
    }
    for (round, t) in order {
        let target = &mut targets[t];
        let bar = if cli.quiet { ProgressBar::hidden() } else { ProgressBar::new(0) };
        bar.set_style(
            ProgressStyle::with_template("{prefix:>40} [{bar:30}] {pos}/{len} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{} {} r{round}", name(scenario), target.registry.url));
        // Each round starts on a quiet disk: what the previous round left unsynced (a registry
        // that does not fsync leaves much) is written back now, not during the next round,
        // where the next registry's fsyncs would wait behind it.
        tokio::task::spawn_blocking(|| {
            // SAFETY: sync(2) takes no arguments and cannot fail.
            unsafe { libc::sync() }
        })
        .await?;
        let params = Params { meter: target.meter.clone(), ..params.clone() };
        let fut = run_once(scenario, &target.registry, &target.recorder, &params, round, &bar);
        let mut work = match tokio::time::timeout(Duration::from_secs(cli.max_seconds), fut).await {
            Ok(w) => w.with_context(|| format!("{} against {}", name(scenario), target.registry.url))?,
            Err(_) => bail!("{} against {} exceeded {} s", name(scenario), target.registry.url, cli.max_seconds),
        };
        bar.finish_and_clear();
        work.cpu = target.meter.take();
        target.work.push(work);
    }
    Ok(targets
        .into_iter()
        .map(|t| {
            let seconds: f64 = t.work.iter().map(|w| w.seconds).sum();
            let mut totals: BTreeMap<String, f64> = BTreeMap::new();
            for w in &t.work {
                for (k, v) in &w.counts {
                    *totals.entry(k.clone()).or_default() += v;
                }
            }
            let rates =
                totals.iter().map(|(k, v)| (format!("{k}/s"), if seconds > 0.0 { v / seconds } else { 0.0 })).collect();
            let cpu = t.work.iter().fold(cpu::Spent::default(), |a, w| a.add(w.cpu));
            let machine = cpu.machine.and_then(cpu::Machine::idle_and_steal_pct);
            let per = |secs: f64| -> BTreeMap<String, f64> {
                totals.iter().filter(|(_, &n)| n > 0.0).map(|(k, &n)| (k.clone(), secs * 1e3 / n)).collect()
            };
            Outcome {
                target: t.registry.url.clone(),
                scenario: name(scenario),
                seconds,
                rates,
                latencies: t.recorder.latencies(),
                errors: t.work.iter().map(|w| w.errors).sum(),
                peak_rss_mib: report::peak_rss_mib(t.meter.pids()),
                server_cpu_ms: cpu.server.map(per).unwrap_or_default(),
                client_cpu_ms: per(cpu.client),
                machine_idle_pct: machine.map(|m| m.0),
                machine_steal_pct: machine.map(|m| m.1),
            }
        })
        .collect())
}

async fn run_once(
    s: Scenario,
    reg: &Registry,
    rec: &Recorder,
    p: &Params,
    round: usize,
    bar: &ProgressBar,
) -> Result<Work> {
    match s {
        Scenario::PushLarge => scenarios::push_large(reg, rec, p, round, false, bar).await,
        Scenario::PushChunked => scenarios::push_large(reg, rec, p, round, true, bar).await,
        Scenario::PullLarge => scenarios::pull_large(reg, rec, p, round, bar).await,
        Scenario::PushImages => scenarios::push_images(reg, rec, p, round, bar).await,
        Scenario::PullImages => scenarios::pull_images(reg, rec, p, round, bar).await,
        Scenario::ManifestGet => scenarios::manifest_get(reg, rec, p, round, bar).await,
        Scenario::Mixed => scenarios::mixed(reg, rec, p, round, bar).await,
        Scenario::All | Scenario::Limits => bail!("not a single scenario"),
    }
}
