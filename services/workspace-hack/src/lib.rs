//! Feature unification for the whole workspace, generated and kept by `cargo hakari`.
//!
//! Every member depends on this crate, whose dependency list is the union of the features the
//! workspace asks of each third-party crate. So `cargo test --release --workspace` and
//! `cargo build --release -p berth` resolve the same features and share one build: RocksDB's
//! C++ is compiled once, not once per command. After changing dependencies, run
//! `cargo hakari generate` (`.ci/run` checks that building `berth` after the tests compiles
//! nothing again).
