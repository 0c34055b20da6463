//! What the emulator helpers (`gcs`, `azurite`) share: starting a server that stops when the
//! test process exits, raw HTTP requests to it, and reporting what an emulator lacks.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A server process started by [`spawn`].
pub struct Server {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    _child: Child,
    /// The server's wrapper stops it when this pipe closes (when the test process exits).
    _lifeline: Mutex<ChildStdin>,
}

/// Starts `program args` behind a `sh` wrapper that kills it when the test process exits (its
/// `read` returns when our end of its stdin closes). Every line the server prints (stdout and
/// stderr) is passed to `ready`, on a thread that keeps draining them; the first `Some` it
/// returns ends the wait: `Ok(endpoint)` when the server is up, `Err(reason)` when it failed.
pub fn spawn(
    program: &Path,
    args: &[String],
    ready: impl Fn(&str) -> Option<Result<String, String>> + Send + Sync + 'static,
    timeout: Duration,
) -> Result<Server, String> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#""$0" "$@" 2>&1 & pid=$!; read _; kill $pid"#)
        .arg(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    let lifeline = child.stdin.take().unwrap();
    let output = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(output).lines().map_while(Result::ok) {
            if !sent {
                if let Some(result) = ready(&line) {
                    let _ = tx.send(result);
                    sent = true;
                }
            }
        }
    });
    let endpoint = wait(&rx, timeout).map_err(|e| format!("{}: {e}", program.display()))?;
    Ok(Server {
        endpoint,
        _child: child,
        _lifeline: Mutex::new(lifeline),
    })
}

fn wait(rx: &Receiver<Result<String, String>>, timeout: Duration) -> Result<String, String> {
    rx.recv_timeout(timeout)
        .map_err(|_| format!("the server did not report its address within {timeout:?}"))?
}

/// A TCP port that was free a moment ago, for servers that cannot report the port they got.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends one HTTP/1.1 request to `endpoint` (`http://HOST:PORT`); returns the status code and
/// the body (as text).
pub fn request(
    endpoint: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, String) {
    let addr = endpoint.trim_start_matches("http://");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        match TcpStream::connect(addr) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("cannot reach the test server at {endpoint}: {e}"),
        }
    };
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let response = String::from_utf8_lossy(&response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Reports a feature an emulator lacks: one `EMULATOR GAP: STORE: FEATURE: WHAT HAPPENS` line
/// on the test process's stderr, shown even when the test passes (it bypasses the test
/// harness's output capture).
pub fn gap(store: &str, feature: &str, what: &str) {
    let line = format!("EMULATOR GAP: {store}: {feature}: {what}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}
