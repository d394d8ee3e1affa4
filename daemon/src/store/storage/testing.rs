//! Test kit (the unit tests' and the end-to-end tests'): a real S3 server (`s3s-fs`, file-backed, checks SigV4) started on a free loopback
//! port over a temp directory, for any test that needs one.
//!
//! `s3s-fs` is installed by `scripts/install-deps.sh`; when it is missing, [`S3Server::start`]
//! panics with a message saying so (a test that silently skips would hide a broken backend).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[cfg(test)]
use super::{S3Config, S3Credentials, S3Options, S3Target};

/// The access key id every [`S3Server`] accepts.
pub const ACCESS_KEY: &str = "nix-p2p-cache-test";
/// Its secret.
pub const SECRET_KEY: &str = "s3s-fs-secret-5c1e9b7a";

/// A running `s3s-fs`, killed on drop.
pub struct S3Server {
    child: Option<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// Where `s3s-fs` is: on `PATH`, else in `$CARGO_HOME/bin` or `~/.cargo/bin`.
pub fn find_s3s_fs() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(Path::new(&home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.is_file())
}

impl S3Server {
    /// Starts `s3s-fs` on a free loopback port and waits until it accepts connections.
    ///
    /// # Panics
    /// When `s3s-fs` is not installed (run `scripts/install-deps.sh`) or does not come up.
    pub fn start() -> S3Server {
        let bin = find_s3s_fs().unwrap_or_else(|| {
            panic!(
                "s3s-fs is not installed (looked on PATH, in $CARGO_HOME/bin and ~/.cargo/bin): \
                 run scripts/install-deps.sh, which installs it with `cargo install \
                 s3s-fs@0.14.1 --locked --features binary`"
            )
        });
        let dir = tempfile::tempdir().expect("temp dir for s3s-fs");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("s3s-fs data dir");
        // The port is free when asked; another process may take it before s3s-fs binds it,
        // so try a few.
        let mut last = String::new();
        for attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
                .port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let log_path = dir.path().join(format!("s3s-fs-{attempt}.log"));
            let log = std::fs::File::create(&log_path).expect("s3s-fs log file");
            let err_log = log.try_clone().expect("s3s-fs log file");
            let mut child = Command::new(&bin)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                .arg(&data)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(err_log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last = format!(
                        "s3s-fs exited ({status}): {}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                    break;
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return S3Server {
                        child: Some(child),
                        addr,
                        dir,
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("s3s-fs did not listen on {addr} within 60 s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("s3s-fs would not start: {last}");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The directory the server keeps its buckets in (a bucket is a subdirectory, an object
    /// a file under it).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Creates bucket `bucket` (if missing).
    pub fn create_bucket(&self, bucket: &str) {
        std::fs::create_dir_all(self.data_dir().join(bucket)).expect("bucket directory");
    }

    /// The environment a process needs to reach this server with its credentials.
    pub fn env(&self) -> [(&'static str, &'static str); 3] {
        [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_REGION", super::DEFAULT_REGION),
        ]
    }

    /// A config for `s3://bucket/prefix` on this server with the right credentials (as if from
    /// the environment) and default options; creates the bucket.
    #[cfg(test)]
    pub(crate) fn spec(&self, bucket: &str, prefix: &str) -> S3Config {
        self.create_bucket(bucket);
        let credentials = S3Credentials::from_lookup(&|name| match name {
            "AWS_ACCESS_KEY_ID" => Some(ACCESS_KEY.to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some(SECRET_KEY.to_string()),
            _ => None,
        })
        .expect("test credentials");
        S3Config {
            target: S3Target {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
                endpoint: Some(self.endpoint()),
                region: super::DEFAULT_REGION.to_string(),
            },
            credentials,
            options: S3Options::default(),
        }
    }

    /// Kills the server (as a crash would) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
