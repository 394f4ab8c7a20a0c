//! Test certificates, made with the `openssl` command: a certificate authority and
//! certificates it signs for given host names and IP addresses (ECDSA P-256, valid two days).

use std::path::{Path, PathBuf};

use crate::run_tool;

/// A certificate authority in a directory of its own.
pub struct Ca {
    dir: PathBuf,
    /// Its certificate (PEM), what clients trust.
    pub cert: PathBuf,
    key: PathBuf,
}

/// A certificate and its key (PEM files).
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

impl Ca {
    /// A new authority named `name` under `dir`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).expect("CA directory");
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
        run_tool(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                s(&key),
                "-out",
                s(&cert),
            ],
        );
        Ca { dir, cert, key }
    }

    /// A certificate for `name`, valid for the host names and IP addresses in `sans` (as
    /// `DNS:x` or `IP:y`), for servers and clients alike.
    pub fn issue(&self, name: &str, sans: &[&str]) -> Issued {
        let (cert, key, csr, ext) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}-key.pem")),
            self.dir.join(format!("{name}.csr")),
            self.dir.join(format!("{name}.ext")),
        );
        run_tool(
            "openssl",
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                s(&key),
                "-out",
                s(&csr),
            ],
        );
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName={}\n",
                sans.join(",")
            ),
        )
        .expect("extensions file");
        run_tool(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                s(&csr),
                "-CA",
                s(&self.cert),
                "-CAkey",
                s(&self.key),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                s(&ext),
                "-out",
                s(&cert),
            ],
        );
        Issued { cert, key }
    }
}

/// An HTTP client builder that trusts the authority certificate in `ca` and nothing else.
pub fn trusting_only(ca: &Path) -> reqwest::ClientBuilder {
    let pem = std::fs::read(ca).expect("reading the authority's certificate");
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("a PEM certificate"))
}
