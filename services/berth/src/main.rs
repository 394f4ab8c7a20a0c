//! `berth`: one binary for every role of a Berth registry cluster.
//!
//! `berth standalone` runs all roles in one process on one data directory: the storage
//! engine, a single-voter metadata group and the HTTP frontend.

mod admin;
mod cluster_admin;
mod config;
mod follow;
mod frontend;
mod housekeeping;
mod http;
mod meta;
mod metrics;
mod probe;
mod rebalance;
mod scrub;
mod standalone;
mod storage;
mod telemetry;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Berth, a self-hosted OCI container registry cluster.
#[derive(Parser, Debug)]
#[command(name = "berth", version, about)]
struct Cli {
    #[command(subcommand)]
    role: Role,
    /// Worker threads of the process (default: one per core). Several roles sharing a
    /// machine's cores run faster with fewer each: `deploy/local/cluster.sh` gives each of its
    /// eight processes one.
    #[arg(long, global = true, env = "BERTH_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    /// How log lines are written to stderr: `text`, or `json` (one object per line). Either
    /// way a request's lines name its request id and trace id.
    #[arg(long, global = true, env = "BERTH_LOG_FORMAT", value_enum, default_value_t)]
    log_format: telemetry::LogFormat,
}

#[derive(Subcommand, Debug)]
enum Role {
    /// Every role in one process, on one data directory (the embedded default).
    Standalone(config::StandaloneArgs),
    /// One node of the metadata group (Raft), serving gRPC.
    Meta(meta::MetaArgs),
    /// A storage node: blob bytes, served over gRPC.
    Storage(storage::StorageArgs),
    /// The registry's HTTP API over the metadata group and a storage node.
    Frontend(frontend::FrontendArgs),
    /// Manage users, organizations, teams, tokens and packages of a running registry, and
    /// the metadata group of a cluster.
    Admin(admin::AdminArgs),
    /// Asks a role's probe (e.g. http://127.0.0.1:5000/readyz) and succeeds on a 2xx answer:
    /// a health check for containers, whose image has no shell or curl.
    Probe(probe::ProbeArgs),
}

/// glibc's allocator keeps up to eight arenas per core and, after a large buffer is freed,
/// raises its mmap threshold so later large buffers come from arenas that rarely shrink. Under
/// many concurrent uploads that holds RSS near its peak; two arenas and a fixed threshold
/// (buffers of 4 MiB and more always mmapped, so returned on free) keep it near what is in use.
///
/// A fixed threshold also fixes the trim threshold at its default, 128 KiB: freeing a blob's
/// buffer of a few hundred KiB at the top of an arena gave the pages back to the kernel, and
/// the next buffer faulted them in again, zeroed. Letting an arena keep 16 MiB at its top
/// (32 MiB at most for the two) took 9% off the CPU a 3/3/2 cluster spends on pushes of
/// images of 256 KiB layers (10.1 s instead of 11.1 s for 400 images, 3 runs each).
fn bound_allocator_memory() {
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}

/// Raises the soft limit on open files to the hard limit. Each connection is a descriptor and
/// the default soft limit (often 1024) caps a registry at about that many clients at once;
/// the hard limit is what the operator allowed.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!("could not raise the open files limit");
            }
        }
    }
}

/// Errors end the process with one line on stderr (the error and its causes), not anyhow's
/// debug form, which prints a stack trace whenever `RUST_BACKTRACE` is set.
fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    bound_allocator_memory();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.threads {
        runtime.worker_threads(n.into());
    }
    let runtime = runtime.enable_all().build()?;
    let serving = match cli.role {
        Role::Standalone(_) => Some("standalone"),
        Role::Meta(_) => Some("meta"),
        Role::Storage(_) => Some("storage"),
        Role::Frontend(_) => Some("frontend"),
        Role::Admin(_) | Role::Probe(_) => None,
    };
    let telemetry = runtime.block_on(async { telemetry::init(cli.log_format, serving) })?;
    raise_open_files_limit();
    if serving.is_some() {
        runtime.block_on(async { metrics::install() });
    }
    let result = match cli.role {
        Role::Standalone(args) => runtime.block_on(standalone::run(config::StandaloneConfig::load(args)?)),
        Role::Meta(args) => runtime.block_on(meta::run(args)),
        Role::Storage(args) => runtime.block_on(storage::run(args)),
        Role::Frontend(args) => runtime.block_on(frontend::run(args)),
        Role::Admin(args) => runtime.block_on(admin::run(args)),
        Role::Probe(args) => runtime.block_on(probe::run(args)),
    };
    // The exporter sends its last batch over a channel that lives on the runtime.
    runtime.block_on(async {
        if let Err(e) = tokio::task::spawn_blocking(move || telemetry.flush()).await {
            eprintln!("berth: flushing telemetry: {e}");
        }
    });
    result
}

/// Completes on SIGTERM or SIGINT: every role stops gracefully on either.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!(error = %e, "cannot listen for SIGINT either");
            }
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
