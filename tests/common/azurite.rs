//! A real Azure Blob Storage emulator for the object-store tests: Azurite's blob service (npm),
//! started once per test binary on a free port with in-memory storage and stopped when the
//! binary exits.
//!
//! `make azurite` (run by `make test`) installs it into `target/azurite`; set `DFNDR_AZURITE` to
//! use another `azurite-blob` executable.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use super::emulator::{request, spawn, Server};

/// What `make azurite` installs.
pub const EMULATOR: &str = "Azurite 3.37.0";

/// Azurite's well-known development account and its key.
const ACCOUNT: &str = "devstoreaccount1";
const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn azurite_path() -> PathBuf {
    if let Some(p) = std::env::var_os("DFNDR_AZURITE") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/azurite/node_modules/.bin/azurite-blob");
    assert!(
        p.exists(),
        "the object-store tests need a local Azure Blob Storage emulator: run `make azurite` \
         (installs Azurite into target/azurite) or set DFNDR_AZURITE to an azurite-blob \
         executable"
    );
    p
}

/// The environment that points dfndr's Azure client at the emulator (which implies its
/// well-known account and key).
pub fn azure_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
        ("AZURITE_BLOB_STORAGE_URL", endpoint.to_string()),
    ]
}

/// The shared emulator, started on first use; this process's environment is pointed at it.
pub fn azurite() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let args = [
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            "0",
            "--inMemoryPersistence",
            "--extentMemoryLimit",
            "1024",
            "--silent",
            "--disableTelemetry",
            "--skipApiVersionCheck",
        ]
        .map(str::to_string);
        let ready = |line: &str| {
            let at = line.find("successfully listens on http://")?;
            let url = &line[at + "successfully listens on ".len()..];
            Some(Ok(url.trim().to_string()))
        };
        let server = spawn(&azurite_path(), &args, ready, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}"));
        for (key, value) in azure_env(&server.endpoint) {
            std::env::set_var(key, value);
        }
        server
    })
}

/// A new, empty container with a unique name; returns its `az://` URL.
pub fn new_container(label: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let server = azurite();
    let name = format!(
        "dfndr-{label}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let path = format!("/{ACCOUNT}/{name}");
    let date = http_date(SystemTime::now());
    let version = "2021-08-06";
    // Shared Key authorization: the 12 standard header fields (all empty here), the x-ms-*
    // headers, then the resource.
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}{path}\n\
         restype:container"
    );
    let key = base64_decode(ACCOUNT_KEY);
    let signature = base64_encode(&hmac_sha256(&key, to_sign.as_bytes()));
    let (status, response) = request(
        &server.endpoint,
        "PUT",
        &format!("{path}?restype=container"),
        &[
            ("x-ms-date", date),
            ("x-ms-version", version.into()),
            ("Authorization", format!("SharedKey {ACCOUNT}:{signature}")),
        ],
        b"",
    );
    assert_eq!(status, 201, "cannot create container {name}: {response}");
    format!("az://{name}")
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .to_vec()
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut n, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = BASE64.iter().position(|&b| b == c).expect("base64") as u32;
        n = n << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((n >> bits) as u8);
        }
    }
    out
}

/// An RFC 1123 date (`Mon, 07 Dec 2026 02:41:43 GMT`).
fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{weekday}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        months[(month - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}
