// Cargo resolves a crate's build-dependencies only when it has a build script; this one exists so
// that the build-time dependencies listed in Cargo.toml take part in feature unification.
fn main() {}
