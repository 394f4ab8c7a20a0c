//! Real registry clients against `berth standalone`: skopeo, podman, oras and docker.
//!
//! Images are built offline (umoci for OCI layouts, `docker import` of a tarball for the
//! engine), pushed, pulled back and compared. In CI every client must be present; on a
//! developer's machine a missing client skips its test with a message.

use std::path::Path;
use std::process::Command;

use berth_tests::{have_tool, Server, ADMIN, ADMIN_TOKEN};
use serde_json::Value;

fn run(cmd: &str, args: &[&str]) -> String {
    berth_tests::run_tool(cmd, args)
}

fn fails(cmd: &str, args: &[&str]) -> bool {
    !Command::new(cmd).args(args).output().expect("running a client").status.success()
}

fn write(path: &Path, content: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

/// Builds an OCI layout at `layout` with image `tag`: two layers, a label, `arch`.
fn umoci_image(work: &Path, layout: &Path, tag: &str, arch: &str, seed: &str) {
    let l = layout.to_str().unwrap();
    if !layout.exists() {
        run("umoci", &["init", "--layout", l]);
    }
    let base = format!("{l}:{tag}-base");
    run("umoci", &["new", "--image", &base]);
    let b1 = work.join(format!("{tag}-b1"));
    run("umoci", &["unpack", "--image", &base, b1.to_str().unwrap()]);
    write(&b1.join("rootfs/etc/berth-test"), &format!("first layer {seed}\n"));
    write(&b1.join("rootfs/data/one.bin"), &seed.repeat(10_000));
    let step = format!("{l}:{tag}-step");
    run("umoci", &["repack", "--image", &step, b1.to_str().unwrap()]);
    let b2 = work.join(format!("{tag}-b2"));
    run("umoci", &["unpack", "--image", &step, b2.to_str().unwrap()]);
    write(&b2.join("rootfs/data/two.txt"), &format!("second layer {seed}\n"));
    let full = format!("{l}:{tag}");
    run("umoci", &["repack", "--image", &full, b2.to_str().unwrap()]);
    run(
        "umoci",
        &[
            "config",
            "--image",
            &full,
            "--architecture",
            arch,
            "--os",
            "linux",
            "--config.label",
            &format!("test.seed={seed}"),
        ],
    );
}

/// Adds a multi-arch index over two tags of `layout` as tag `multi`.
fn add_index(layout: &Path, tags: &[(&str, &str)]) {
    let index_path = layout.join("index.json");
    let mut index: Value = serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let entries = index["manifests"].as_array().unwrap().clone();
    let mut children = vec![];
    for (tag, arch) in tags {
        let e = entries
            .iter()
            .rfind(|e| e["annotations"]["org.opencontainers.image.ref.name"] == *tag)
            .unwrap_or_else(|| panic!("tag {tag} in layout"));
        children.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": e["digest"], "size": e["size"],
            "platform": {"architecture": arch, "os": "linux"}
        }));
    }
    let child_index = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": children
    });
    let bytes = serde_json::to_vec(&child_index).unwrap();
    let d = berth_tests::digest(&bytes);
    std::fs::write(layout.join("blobs/sha256").join(d.trim_start_matches("sha256:")), &bytes).unwrap();
    index["manifests"].as_array_mut().unwrap().push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": bytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": "multi"}
    }));
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
}

/// skopeo with a private auth file (`--authfile` goes after the subcommand).
fn skopeo(auth: &Path, args: &[&str]) -> String {
    let mut full = vec![args[0], "--authfile", auth.to_str().unwrap()];
    full.extend_from_slice(&args[1..]);
    run("skopeo", &full)
}

fn inspect_raw(auth: &Path, reference: &str) -> String {
    skopeo(auth, &["inspect", "--tls-verify=false", "--raw", reference])
}

#[test]
fn skopeo_round_trips() {
    if !have_tool("skopeo") || !have_tool("umoci") {
        return;
    }
    let s = Server::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    umoci_image(work.path(), &layout, "v1", "amd64", "a");
    umoci_image(work.path(), &layout, "v1-arm", "arm64", "b");
    add_index(&layout, &[("v1", "amd64"), ("v1-arm", "arm64")]);
    let l = layout.to_str().unwrap();
    let reg = format!("docker://{}/acme/skopeo", s.addr);
    let auth = work.path().join("auth.json");
    let sk = |args: &[&str]| skopeo(&auth, args);
    sk(&["login", "--tls-verify=false", "-u", ADMIN, "-p", ADMIN_TOKEN, &s.addr]);

    // Single-arch image with several layers.
    sk(&["copy", "--dest-tls-verify=false", &format!("oci:{l}:v1"), &format!("{reg}:v1")]);
    let local = sk(&["inspect", "--raw", &format!("oci:{l}:v1")]);
    let remote = inspect_raw(&auth, &format!("{reg}:v1"));
    assert_eq!(local, remote, "manifest bytes unchanged by the round trip");
    let m: Value = serde_json::from_str(&remote).unwrap();
    assert!(m["layers"].as_array().unwrap().len() >= 2);
    let out = work.path().join("out");
    sk(&["copy", "--src-tls-verify=false", &format!("{reg}:v1"), &format!("oci:{}:v1", out.display())]);
    assert_eq!(sk(&["inspect", "--raw", &format!("oci:{}:v1", out.display())]), local);

    // Pull by digest.
    let digest = berth_tests::digest(remote.as_bytes());
    let by_digest = work.path().join("by-digest");
    sk(&["copy", "--src-tls-verify=false", &format!("{reg}@{digest}"), &format!("oci:{}:x", by_digest.display())]);
    assert_eq!(sk(&["inspect", "--raw", &format!("oci:{}:x", by_digest.display())]), local);

    // A multi-arch index with --all.
    sk(&["copy", "--all", "--dest-tls-verify=false", &format!("oci:{l}:multi"), &format!("{reg}:multi")]);
    let index: Value = serde_json::from_str(&inspect_raw(&auth, &format!("{reg}:multi"))).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2);
    let all_out = work.path().join("all-out");
    sk(&["copy", "--all", "--src-tls-verify=false", &format!("{reg}:multi"), &format!("oci:{}:m", all_out.display())]);
    let arm = sk(&["inspect", "--tls-verify=false", "--override-arch", "arm64", &format!("{reg}:multi")]);
    let arm: Value = serde_json::from_str(&arm).unwrap();
    assert_eq!(arm["Architecture"], "arm64");

    // Docker schema 2 by conversion.
    sk(&["copy", "--format", "v2s2", "--dest-tls-verify=false", &format!("oci:{l}:v1"), &format!("{reg}:v2s2")]);
    let v2: Value = serde_json::from_str(&inspect_raw(&auth, &format!("{reg}:v2s2"))).unwrap();
    assert_eq!(v2["mediaType"], "application/vnd.docker.distribution.manifest.v2+json");
    let v2_out = work.path().join("v2-out");
    sk(&["copy", "--src-tls-verify=false", &format!("{reg}:v2s2"), &format!("dir:{}", v2_out.display())]);

    // Tags, then delete.
    let tags: Value = serde_json::from_str(&sk(&["list-tags", "--tls-verify=false", &reg])).unwrap();
    let mut tags: Vec<&str> = tags["Tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    tags.sort();
    assert_eq!(tags, ["multi", "v1", "v2s2"]);
    sk(&["delete", "--tls-verify=false", &format!("{reg}:v2s2")]);
    assert!(fails(
        "skopeo",
        &["inspect", "--authfile", auth.to_str().unwrap(), "--tls-verify=false", "--raw", &format!("{reg}:v2s2")]
    ));
    assert_eq!(inspect_raw(&auth, &format!("{reg}:v1")), local, "other tags are untouched");
}

#[test]
fn podman_push_and_pull() {
    if !have_tool("podman") || !have_tool("umoci") {
        return;
    }
    let s = Server::start();
    // podman names an `oci:` image after its path, which must be lower case.
    let work = tempfile::Builder::new()
        .prefix(&format!("berth-podman-{}", std::process::id()))
        .rand_bytes(0)
        .tempdir()
        .unwrap();
    let layout = work.path().join("layout");
    umoci_image(work.path(), &layout, "v1", "amd64", "p");
    let root = work.path().join("root");
    let runroot = work.path().join("runroot");
    let podman = |args: &[&str]| {
        let mut full =
            vec!["--root", root.to_str().unwrap(), "--runroot", runroot.to_str().unwrap(), "--storage-driver", "vfs"];
        full.extend_from_slice(args);
        run("podman", &full)
    };
    let target = format!("{}/acme/podman:v1", s.addr);
    podman(&["pull", &format!("oci:{}:v1", layout.display())]);
    let id = podman(&["images", "-q", "--no-trunc"]).lines().next().unwrap().trim().to_string();
    podman(&["tag", &id, &target]);
    let auth = work.path().join("auth.json");
    let auth = auth.to_str().unwrap();
    podman(&["login", "--authfile", auth, "--tls-verify=false", "-u", ADMIN, "-p", ADMIN_TOKEN, &s.addr]);
    podman(&["push", "--authfile", auth, "--tls-verify=false", &target]);
    podman(&["rmi", "-a", "-f"]);
    podman(&["pull", "--authfile", auth, "--tls-verify=false", &target]);
    let pulled = podman(&["image", "inspect", "--format", "{{.Id}}", &target]);
    assert_eq!(pulled.trim().trim_start_matches("sha256:"), id.trim_start_matches("sha256:"));
}

#[test]
fn oras_artifacts_and_referrers() {
    if !have_tool("python3") {
        return;
    }
    let has_oras = Command::new("python3").args(["-c", "import oras.client"]).status().is_ok_and(|s| s.success());
    if !has_oras {
        assert!(!berth_tests::in_ci(), "the oras package is required in CI (.ci/run installs it)");
        eprintln!("SKIPPED: python package oras is not installed");
        return;
    }
    let s = Server::start();
    let work = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/oras_roundtrip.py");
    let out = run("python3", &[script.to_str().unwrap(), &s.addr, work.path().to_str().unwrap(), ADMIN, ADMIN_TOKEN]);
    assert!(out.contains("oras round trip ok"), "{out}");
}

#[test]
fn docker_push_rmi_pull_by_tag_and_digest() {
    let Some(cli) = berth_tests::DockerCli::available() else { return };
    let s = Server::start();
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    write(&rootfs.join("hello.txt"), "hello from berth\n");
    write(&rootfs.join("data/random.bin"), &berth_tests::digest(b"seed").repeat(50_000));
    let tar = work.path().join("rootfs.tar");
    run("tar", &["-C", rootfs.to_str().unwrap(), "-cf", tar.to_str().unwrap(), "."]);
    let image = format!("{}/acme/docker:v1", s.addr);
    let docker = |args: &[&str]| cli.run(args);
    cli.login(&s.addr, ADMIN, ADMIN_TOKEN);
    docker(&["import", tar.to_str().unwrap(), &image]);
    let id = docker(&["image", "inspect", "--format", "{{.Id}}", &image]).trim().to_string();
    docker(&["push", &image]);
    let repo_digest = docker(&["image", "inspect", "--format", "{{index .RepoDigests 0}}", &image]).trim().to_string();
    assert!(repo_digest.contains("@sha256:"), "{repo_digest}");
    docker(&["rmi", &image]);
    assert!(cli.fails(&["image", "inspect", &image]));

    docker(&["pull", &image]);
    let pulled = docker(&["image", "inspect", "--format", "{{.Id}}", &image]).trim().to_string();
    assert_eq!(pulled, id, "same image (config and layer diff ids) after the round trip");
    docker(&["rmi", &image]);

    docker(&["pull", &repo_digest]);
    let by_digest = docker(&["image", "inspect", "--format", "{{.Id}}", &repo_digest]).trim().to_string();
    assert_eq!(by_digest, id);

    // The content itself: save the pulled image and find the file in one of its layers.
    let saved = work.path().join("saved.tar");
    docker(&["save", "-o", saved.to_str().unwrap(), &repo_digest]);
    let unpacked = work.path().join("saved");
    std::fs::create_dir_all(&unpacked).unwrap();
    run("tar", &["-C", unpacked.to_str().unwrap(), "-xf", saved.to_str().unwrap()]);
    let found = run("sh", &["-c", &format!(
        "find {} -type f | while read f; do tar -xOf \"$f\" ./hello.txt 2>/dev/null || tar -xOf \"$f\" hello.txt 2>/dev/null; done; true",
        unpacked.display()
    )]);
    assert_eq!(found, "hello from berth\n", "the file inside the pulled image");
    // Anonymous pulls: a public package works, a private one does not.
    let public = format!("{}/acme/docker-public:v1", s.addr);
    docker(&["tag", &repo_digest, &public]);
    docker(&["push", &public]);
    run(
        "curl",
        &[
            "-sf",
            "-X",
            "PATCH",
            "-u",
            &format!("{ADMIN}:{ADMIN_TOKEN}"),
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"visibility":"public"}"#,
            &format!("{}/api/packages/acme/docker-public", s.url),
        ],
    );
    docker(&["logout", &s.addr]);
    docker(&["rmi", &public, &repo_digest]);
    docker(&["pull", &public]);
    assert!(cli.fails(&["pull", &image]), "an anonymous pull of a private package fails");
    docker(&["rmi", &public]);
}

/// The packages API's delete and restore as docker sees them: a deleted package does not pull,
/// a restored one pulls the same image again.
#[test]
fn docker_pull_fails_after_a_package_delete_and_works_after_its_restore() {
    let Some(cli) = berth_tests::DockerCli::available() else { return };
    let s = Server::start();
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    write(&rootfs.join("restored.txt"), "deleted, then restored\n");
    let tar = work.path().join("rootfs.tar");
    run("tar", &["-C", rootfs.to_str().unwrap(), "-cf", tar.to_str().unwrap(), "."]);
    let image = format!("{}/admin/restorable:v1", s.addr);
    let docker = |args: &[&str]| cli.run(args);
    cli.login(&s.addr, ADMIN, ADMIN_TOKEN);
    docker(&["import", tar.to_str().unwrap(), &image]);
    let id = docker(&["image", "inspect", "--format", "{{.Id}}", &image]).trim().to_string();
    docker(&["push", &image]);
    docker(&["rmi", &image]);
    let package = format!("{}/api/v3/users/admin/packages/container/restorable", s.url);
    let api = |method: &str, url: &str| {
        run(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                method,
                "-u",
                &format!("{ADMIN}:{ADMIN_TOKEN}"),
                url,
            ],
        )
    };
    assert_eq!(api("DELETE", &package), "204");
    assert!(cli.fails(&["pull", &image]), "a deleted package does not pull");
    assert_eq!(api("POST", &format!("{package}/restore")), "204");
    docker(&["pull", &image]);
    let pulled = docker(&["image", "inspect", "--format", "{{.Id}}", &image]).trim().to_string();
    assert_eq!(pulled, id, "the restored image is the one pushed");
    docker(&["rmi", &image]);
}
