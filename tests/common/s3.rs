//! A real S3-compatible server for the object-store tests: moto's server mode, started once per
//! test binary on a free port and stopped when the binary exits.
//!
//! `make s3-server` (run by `make test`) installs moto into `target/moto-venv`; set
//! `DFNDR_MOTO_SERVER` to use another `moto_server` executable.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The running server.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    _child: Child,
    /// The server's wrapper stops it when this pipe closes (when the test process exits).
    _lifeline: Mutex<ChildStdin>,
}

fn moto_server_path() -> PathBuf {
    if let Some(p) = std::env::var_os("DFNDR_MOTO_SERVER") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/moto-venv/bin/moto_server");
    assert!(
        p.exists(),
        "the object-store tests need a local S3 server: run `make s3-server` (installs moto \
         into target/moto-venv) or set DFNDR_MOTO_SERVER to a moto_server executable"
    );
    p
}

/// The environment that points the AWS client of dfndr at the test server.
pub fn s3_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT", endpoint.to_string()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_REGION", "us-east-1".into()),
    ]
}

/// The shared server, started on first use; this process's environment is pointed at it.
pub fn s3_server() -> &'static S3Server {
    static SERVER: OnceLock<S3Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let server = moto_server_path();
        // `read` returns when our end of stdin closes, i.e. when the test process is gone.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#""$0" -H 127.0.0.1 -p 0 & pid=$!; read _; kill $pid"#)
            .arg(&server)
            .env("S3_UPLOAD_PART_MIN_SIZE", "5242880")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", server.display()));
        let lifeline = child.stdin.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Keep draining the server's request log so it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(at) = line.find("Running on http://") {
                        let url = line[at + "Running on ".len()..].trim().to_string();
                        let _ = tx.send(url);
                        sent = true;
                    }
                }
            }
        });
        let endpoint = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("moto_server did not report its address within 60 s");
        for (key, value) in s3_env(&endpoint) {
            std::env::set_var(key, value);
        }
        S3Server {
            endpoint,
            _child: child,
            _lifeline: Mutex::new(lifeline),
        }
    })
}

/// Sends one raw HTTP request to the server; returns the status code.
fn http(endpoint: &str, method: &str, path: &str) -> u16 {
    let addr = endpoint.trim_start_matches("http://");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match TcpStream::connect(addr) {
            Ok(mut stream) => {
                let request = format!(
                    "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\
                     Connection: close\r\n\r\n"
                );
                stream.write_all(request.as_bytes()).unwrap();
                let mut response = String::new();
                stream.read_to_string(&mut response).unwrap();
                return response
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("cannot reach the S3 test server at {endpoint}: {e}"),
        }
    }
}

/// A new, empty bucket with a unique name; returns its `s3://` URL.
pub fn new_bucket(label: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let server = s3_server();
    let name = format!(
        "dfndr-{label}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let status = http(&server.endpoint, "PUT", &format!("/{name}"));
    assert_eq!(status, 200, "cannot create bucket {name}");
    format!("s3://{name}")
}
