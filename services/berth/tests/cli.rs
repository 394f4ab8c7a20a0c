//! The binary's command line. (Having an integration test here also makes `cargo test` build
//! the `berth` binary that the cross-process tests in `tests/` start.)

use std::process::Command;

#[test]
fn roles_and_flags_are_documented() {
    let out = Command::new(env!("CARGO_BIN_EXE_berth")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(help.contains("standalone") && help.contains("admin"), "{help}");
    let out = Command::new(env!("CARGO_BIN_EXE_berth")).args(["standalone", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--listen", "--data-dir", "--config", "--bootstrap-admin", "--max-blob-bytes", "--upload-timeout-secs"]
    {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

#[test]
fn bad_flags_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["standalone", "--bootstrap-admin", "nocolon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("USER:TOKEN"));
}
