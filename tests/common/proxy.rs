//! A TCP proxy between dfndr and the S3 test server that breaks connections on purpose: it
//! cuts the response to a `GET` of a `.tar` object after a number of body bytes (a connection
//! reset mid-download), and can be switched to refuse everything (a store that went away).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The running proxy; it stops serving when dropped.
pub struct Proxy {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    state: Arc<State>,
}

struct State {
    upstream: String,
    /// Cuts still to make.
    cuts_left: AtomicUsize,
    /// Bytes of a `.tar` GET response after which it is cut.
    cut_after: usize,
    /// Cuts made so far.
    cuts_made: AtomicUsize,
    /// `.tar` GET requests seen.
    tar_gets: AtomicUsize,
    refuse: AtomicBool,
    stopped: AtomicBool,
    /// Open connections, to cut them all when refusing.
    open: Mutex<Vec<TcpStream>>,
}

impl Proxy {
    /// Forwards to `upstream` (`http://host:port`), cutting the first `cuts` responses to a
    /// `GET` of a `.tar` object after `cut_after` bytes.
    pub fn start(upstream: &str, cuts: usize, cut_after: usize) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State {
            upstream: upstream.trim_start_matches("http://").to_string(),
            cuts_left: AtomicUsize::new(cuts),
            cut_after,
            cuts_made: AtomicUsize::new(0),
            tar_gets: AtomicUsize::new(0),
            refuse: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            open: Mutex::new(Vec::new()),
        });
        let st = Arc::clone(&state);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = conn else { continue };
                if st.refuse.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&st.upstream) else {
                    continue;
                };
                let st = Arc::clone(&st);
                std::thread::spawn(move || serve(st, client, server));
            }
        });
        Proxy { endpoint, state }
    }

    /// Cuts every open connection and refuses new ones from now on.
    pub fn refuse_all(&self) {
        self.state.refuse.store(true, Ordering::SeqCst);
        for c in self.state.open.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Responses cut so far.
    pub fn cuts_made(&self) -> usize {
        self.state.cuts_made.load(Ordering::SeqCst)
    }

    /// `GET` requests of `.tar` objects seen so far.
    pub fn tar_gets(&self) -> usize {
        self.state.tar_gets.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.refuse_all();
        self.state.stopped.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees `stopped`.
        let _ = TcpStream::connect(self.endpoint.trim_start_matches("http://"));
    }
}

/// Relays one connection both ways. Requests are sequential on an HTTP/1.1 connection, so
/// the request seen last tells which response the server is sending.
fn serve(st: Arc<State>, client: TcpStream, server: TcpStream) {
    {
        let mut open = st.open.lock().unwrap();
        open.push(client.try_clone().unwrap());
        open.push(server.try_clone().unwrap());
    }
    // Bytes of the current response when it answers a `.tar` GET; usize::MAX otherwise.
    let counter = Arc::new(AtomicUsize::new(usize::MAX));
    let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let up_counter = Arc::clone(&counter);
    let up_state = Arc::clone(&st);
    let up = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match c_in.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let head = String::from_utf8_lossy(&buf[..n.min(512)]);
            if let Some(line) = head.lines().next() {
                let mut parts = line.split_whitespace();
                if let (Some(method), Some(path)) = (parts.next(), parts.next()) {
                    if method.chars().all(|c| c.is_ascii_uppercase()) && line.contains("HTTP/1.") {
                        let tar_get = method == "GET"
                            && path.split('?').next().unwrap_or("").ends_with(".tar");
                        if tar_get {
                            up_state.tar_gets.fetch_add(1, Ordering::SeqCst);
                        }
                        up_counter.store(if tar_get { 0 } else { usize::MAX }, Ordering::SeqCst);
                    }
                }
            }
            if s_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s_out.shutdown(Shutdown::Write);
    });
    let (mut s_in, mut c_out) = (server, client);
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match s_in.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let seen = counter.load(Ordering::SeqCst);
        if seen != usize::MAX {
            let total = seen + n;
            counter.store(total, Ordering::SeqCst);
            if total > st.cut_after
                && st
                    .cuts_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
                    .is_ok()
            {
                // Send part of what arrived, then reset the connection mid-body.
                let keep = n.saturating_sub(total - st.cut_after);
                let _ = c_out.write_all(&buf[..keep]);
                st.cuts_made.fetch_add(1, Ordering::SeqCst);
                let _ = c_out.shutdown(Shutdown::Both);
                let _ = s_in.shutdown(Shutdown::Both);
                break;
            }
        }
        if c_out.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = c_out.shutdown(Shutdown::Both);
    let _ = up.join();
}
