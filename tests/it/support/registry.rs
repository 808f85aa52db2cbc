//! A real OCI registry on 127.0.0.1 for tests: Debian's `docker-registry` (the distribution
//! project's `registry:2`), installed by `./scripts/setup.sh`. Each registry is a child
//! process with its own port and storage directory; dropping it stops it.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REGISTRY: &str = "/usr/bin/docker-registry";

pub struct Registry {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("config.yml");
        fs_err::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = fs_err::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap().into_parts().0)
            .stderr(log.into_parts().0)
            .spawn()
            .expect("docker-registry");
        let mut registry = Registry { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || registry.child.try_wait().unwrap().is_some() {
                panic!(
                    "the registry did not start on port {port}:\n{}",
                    registry.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        registry
    }

    /// `127.0.0.1:PORT`
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        fs_err::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Every blob file the registry stores (`…/blobs/sha256/xx/<digest>/data`).
    pub fn blob_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            let Ok(listing) = fs_err::read_dir(dir) else {
                return;
            };
            for child in listing {
                let path = child.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.file_name().is_some_and(|n| n == "data")
                    && path.to_string_lossy().contains("/blobs/")
                {
                    out.push(path);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.dir.path().join("data"), &mut out);
        out
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
