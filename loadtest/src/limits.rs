//! The machine's limits, measured the way a registry would hit them: one core hashing
//! SHA-256, bytes over a loopback TCP connection, sequential writes made durable by fsync, and
//! writing memory the process has just mapped.
//!
//! The last one matters on a virtual machine whose host backs guest memory only while the
//! guest uses it: pages the guest has freed are handed back to the host after a few seconds
//! (free page reporting), and touching one again costs a trip to the host, several times the
//! cost of a page freed a moment ago (seen here: 0.4-0.7 GB/s against 2.4-2.8 GB/s). A
//! registry's writes land in the page cache, which grows into such pages while the machine
//! has free memory; every byte written then pays the first rate, and a registry that keeps
//! more copies pays it more often.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Measured limits.
#[derive(Debug, Serialize)]
pub struct Limits {
    /// SHA-256 on one core, MB/s.
    pub sha256_mb_s: f64,
    /// One TCP stream over loopback, MB/s.
    pub loopback_mb_s: f64,
    /// Sequential writes of 8 MiB followed by one fsync, MB/s.
    pub disk_fsync_write_mb_s: f64,
    /// Small (4 KiB) write + fdatasync pairs per second.
    pub fsyncs_per_s: f64,
    /// Writing 1 GiB of pages just mapped, MB/s.
    pub memory_fresh_mb_s: f64,
    /// The same again at once, on the pages just freed, MB/s.
    pub memory_reused_mb_s: f64,
}

/// Bytes of memory each memory measurement writes.
const SAMPLE: u64 = 1 << 30;

/// Writes [`SAMPLE`] bytes of newly allocated memory; returns MB/s. An allocation this large
/// is a fresh mapping of its own (glibc maps anything past 32 MiB and unmaps it when freed).
fn write_fresh() -> f64 {
    let start = Instant::now();
    let v = vec![0x5au8; SAMPLE as usize];
    std::hint::black_box(&v);
    SAMPLE as f64 / 1e6 / start.elapsed().as_secs_f64()
}

/// Measures writing pages just mapped, then the same again at once: the second mapping most
/// likely gets the pages the first freed, before the kernel hands them back to a host (the
/// kernel does not promise which pages it gives, nor that huge pages go alike both times).
fn measure_memory() -> (f64, f64) {
    (write_fresh(), write_fresh())
}

/// Measures the limits, using `dir` for the disk measurements.
pub async fn measure(dir: &Path) -> Result<Limits> {
    let (memory_fresh_mb_s, memory_reused_mb_s) = tokio::task::spawn_blocking(measure_memory).await?;

    let data = vec![7u8; 64 << 20];
    let start = Instant::now();
    let mut h = Sha256::new();
    for _ in 0..16 {
        h.update(&data);
    }
    std::hint::black_box(h.finalize());
    let sha256_mb_s = (16.0 * 64.0 * 1.048576) / start.elapsed().as_secs_f64();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let total: u64 = 4 << 30;
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = s.read(&mut buf).await?;
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        Ok::<u64, std::io::Error>(n)
    });
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let chunk = vec![1u8; 1 << 20];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        s.write_all(&chunk).await?;
        sent += chunk.len() as u64;
    }
    s.shutdown().await?;
    drop(s);
    let received = reader.await??;
    let loopback_mb_s = received as f64 / 1e6 / start.elapsed().as_secs_f64();

    let dir = dir.to_path_buf();
    let (disk, fsyncs) = tokio::task::spawn_blocking(move || -> Result<(f64, f64)> {
        let path = dir.join(".berth-loadtest-fsync");
        let block = vec![3u8; 8 << 20];
        let mut f = std::fs::File::create(&path)?;
        let start = Instant::now();
        for _ in 0..64 {
            f.write_all(&block)?;
        }
        f.sync_all()?;
        let disk = (64.0 * 8.0 * 1.048576) / start.elapsed().as_secs_f64();
        drop(f);
        let mut f = std::fs::File::create(&path)?;
        let small = vec![5u8; 4096];
        let start = Instant::now();
        for _ in 0..200 {
            f.write_all(&small)?;
            f.sync_data()?;
        }
        let fsyncs = 200.0 / start.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&path);
        Ok((disk, fsyncs))
    })
    .await??;
    Ok(Limits {
        sha256_mb_s,
        loopback_mb_s,
        disk_fsync_write_mb_s: disk,
        fsyncs_per_s: fsyncs,
        memory_fresh_mb_s,
        memory_reused_mb_s,
    })
}

/// Prints the limits.
pub fn print(l: &Limits) {
    println!("\n== machine limits ==");
    println!("{:<40}{:>12.0}", "SHA-256, one core (MB/s)", l.sha256_mb_s);
    println!("{:<40}{:>12.0}", "loopback TCP, one stream (MB/s)", l.loopback_mb_s);
    println!("{:<40}{:>12.0}", "disk, 512 MiB written + fsync (MB/s)", l.disk_fsync_write_mb_s);
    println!("{:<40}{:>12.0}", "disk, 4 KiB write + fdatasync (/s)", l.fsyncs_per_s);
    println!("{:<40}{:>12.0}", "memory, 1 GiB just mapped (MB/s)", l.memory_fresh_mb_s);
    println!("{:<40}{:>12.0}", "memory, 1 GiB just freed (MB/s)", l.memory_reused_mb_s);
}
