//! The container image (`deploy/image.sh`, built offline from the release binary) on the
//! Docker engine: it runs `berth standalone`, docker logs in, pushes the image itself into the
//! registry it runs, and pulls it back; `docker stop` ends it cleanly.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use berth_tests::{berth_bin, run_tool, DockerCli, ADMIN, ADMIN_TOKEN};

/// Removes the test's container and images however the test ends.
struct Cleanup {
    container: Option<String>,
    images: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(c) = &self.container {
            let _ = Command::new("docker").args(["rm", "-f", "-v", c]).output();
        }
        for i in &self.images {
            let _ = Command::new("docker").args(["rmi", "-f", i]).output();
        }
    }
}

#[test]
fn the_image_runs_berth_and_takes_a_push_of_itself() {
    let Some(cli) = DockerCli::available() else { return };
    let image = format!("berth-test-image:{}", std::process::id());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/image.sh");
    let mut cleanup = Cleanup { container: None, images: vec![image.clone()] };
    let out = Command::new("bash")
        .arg(&script)
        .arg(&image)
        .env("BERTH_BIN", berth_bin())
        .output()
        .expect("running deploy/image.sh");
    assert!(out.status.success(), "deploy/image.sh: {}", String::from_utf8_lossy(&out.stderr));
    let built = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(built.contains(" MB ("), "{built}");
    eprintln!("image: {}", built.trim());

    let admin = format!("{ADMIN}:{ADMIN_TOKEN}");
    let id = run_tool(
        "docker",
        &[
            "run",
            "-d",
            "-p",
            "127.0.0.1::5000",
            &image,
            "standalone",
            "--listen",
            "0.0.0.0:5000",
            "--data-dir",
            "/data",
            "--bootstrap-admin",
            &admin,
        ],
    )
    .trim()
    .to_string();
    cleanup.container = Some(id.clone());
    let port = run_tool("docker", &["port", &id, "5000/tcp"]);
    let port = port.lines().next().and_then(|l| l.rsplit(':').next()).expect("a published port").trim().to_string();
    let addr = format!("127.0.0.1:{port}");
    let started = Instant::now();
    loop {
        let up = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{addr}/v2/")])
            .output();
        if up.is_ok_and(|o| o.stdout == b"401") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "berth in the container never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("container answering {:?} after docker run", started.elapsed());
    for probe in ["healthz", "readyz"] {
        let code =
            run_tool("curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{addr}/{probe}")]);
        assert_eq!(code, "200", "/{probe}");
    }

    // The image pushed into the registry it runs, and pulled back.
    cli.login(&addr, ADMIN, ADMIN_TOKEN);
    let target = format!("{addr}/admin/berth:self");
    cleanup.images.push(target.clone());
    let local = cli.run(&["image", "inspect", "--format", "{{.Id}}", &image]).trim().to_string();
    cli.run(&["tag", &image, &target]);
    cli.run(&["push", &target]);
    cli.run(&["rmi", &target]);
    cli.run(&["pull", &target]);
    let pulled = cli.run(&["image", "inspect", "--format", "{{.Id}}", &target]).trim().to_string();
    assert_eq!(pulled, local, "the image pulled back is the one pushed");

    // docker stop (SIGTERM) ends it cleanly.
    let stopping = Instant::now();
    run_tool("docker", &["stop", "-t", "20", &id]);
    let code = run_tool("docker", &["inspect", "--format", "{{.State.ExitCode}}", &id]);
    assert_eq!(code.trim(), "0", "berth exits 0 on SIGTERM");
    assert!(stopping.elapsed() < Duration::from_secs(15), "stopped in {:?}", stopping.elapsed());
}
