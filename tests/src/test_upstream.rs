//! `TestUpstream`: a small HTTP/1.1 binary cache on loopback for the tests: fixed files, each
//! optionally trickled at a set rate, requests counted per path; `FakePath`, a store path's
//! narinfo and NAR to serve from it; and `noise`, incompressible test bytes.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A file of `files`: its bytes, served as they are.
pub fn plain(body: Vec<u8>) -> File {
    File {
        body: Arc::new(body),
        rate: None,
    }
}

/// One file of a [`TestUpstream`]: its bytes and, if trickled, the rate in bytes per second.
#[derive(Clone)]
pub struct File {
    pub body: Arc<Vec<u8>>,
    pub rate: Option<u64>,
}

pub struct TestUpstream {
    pub port: u16,
    hits: Arc<Mutex<HashMap<String, u32>>>,
}

impl TestUpstream {
    pub fn start(files: HashMap<String, File>) -> TestUpstream {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let files = Arc::new(files);
        let hits: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let h = hits.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let (files, hits) = (files.clone(), h.clone());
                std::thread::spawn(move || serve_conn(s, &files, &hits));
            }
        });
        TestUpstream { port, hits }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn hits(&self, path: &str) -> u32 {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn serve_conn(mut s: TcpStream, files: &HashMap<String, File>, hits: &Mutex<HashMap<String, u32>>) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
    }
    let path = line.split(' ').nth(1).unwrap_or("").to_string();
    *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    let Some(f) = files.get(&path) else {
        let _ = s
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        f.body.len()
    );
    if s.write_all(head.as_bytes()).is_err() {
        return;
    }
    match f.rate {
        None => {
            let _ = s.write_all(&f.body);
        }
        Some(rate) => {
            // 20 slices a second.
            let slice = (rate / 20).max(1) as usize;
            let start = Instant::now();
            for (i, part) in f.body.chunks(slice).enumerate() {
                if s.write_all(part).is_err() {
                    return;
                }
                let due = start + Duration::from_millis(50 * (i as u64 + 1));
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
        }
    }
    let _ = s.flush();
}

/// A fake store path's narinfo (unsigned, uncompressed) and its NAR, under `nar/<name>.nar`.
pub struct FakePath {
    pub hash: String,
    pub nar: Vec<u8>,
    pub nar_b32: String,
    pub narinfo: String,
    pub nar_file: String,
}

pub fn fake_path(hash: &str, name: &str, nar: Vec<u8>) -> FakePath {
    let nar_hash = crate::nar_hash_of(&nar);
    let nar_b32 = nar_hash.strip_prefix("sha256:").unwrap().to_string();
    let narinfo = format!(
        "StorePath: /nix/store/{hash}-{name}\nURL: nar/{name}.nar\nCompression: none\n\
         NarHash: {nar_hash}\nNarSize: {}\nReferences: \n",
        nar.len()
    );
    FakePath {
        hash: hash.to_string(),
        nar,
        nar_b32,
        narinfo,
        nar_file: format!("/nar/{name}.nar"),
    }
}

impl FakePath {
    pub fn files(&self, nar: Vec<u8>, rate: Option<u64>) -> [(String, File); 2] {
        [
            (
                format!("/{}.narinfo", self.hash),
                File {
                    body: Arc::new(self.narinfo.clone().into_bytes()),
                    rate: None,
                },
            ),
            (
                self.nar_file.clone(),
                File {
                    body: Arc::new(nar),
                    rate,
                },
            ),
        ]
    }

    pub fn nar_path(&self) -> String {
        format!("/nar/{}.nar", self.nar_b32)
    }
}

/// `len` pseudo-random bytes from `seed` (incompressible: every chunk new).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
