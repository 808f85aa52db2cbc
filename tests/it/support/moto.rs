//! A real S3-compatible server on 127.0.0.1 for tests: moto in server mode, from PyPI,
//! installed by `./scripts/setup.sh` into `/opt/farm-test-venv`. Each server is a child
//! process with its own port and bucket; dropping it stops it.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `scripts/setup.sh` puts moto's server.
pub const MOTO_SERVER: &str = "/opt/farm-test-venv/bin/moto_server";

pub struct Moto {
    child: Child,
    pub port: u16,
    log: tempfile::NamedTempFile,
}

impl Moto {
    /// Starts moto on a free port and creates `bucket` in it.
    pub fn start(bucket: &str) -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(MOTO_SERVER)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("moto_server");
        let mut moto = Moto { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || moto.child.try_wait().unwrap().is_some() {
                panic!("moto did not start on port {port}:\n{}", moto.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = Command::new("curl")
            .args(["-sSf", "-X", "PUT"])
            .arg(format!("{}/{bucket}", moto.endpoint()))
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "create bucket: {status:?}\n{}",
            moto.log()
        );
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment farm reads an S3 store's place and credentials from.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "farm-test".into()),
            ("AWS_SECRET_ACCESS_KEY", "farm-test-secret".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    pub fn log(&self) -> String {
        fs_err::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
