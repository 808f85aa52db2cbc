//! A real nginx on 127.0.0.1 for tests that need a plain static file server that accepts
//! uploads, such as a binary cache over HTTP: GET and HEAD serve a directory, and PUT stores
//! files in it, creating any missing directories.
//!
//! Why nginx rather than `http_server.rs`: that server serves files registered in memory and
//! is built to misbehave on purpose. Here the point is to talk to a real, well-behaved server
//! (Range, ETag, 201/204 for PUT, 404 for misses). It comes from Debian's `nginx` package,
//! whose binary is built with `http_dav_module`; `./scripts/setup.sh` installs it.
//!
//! Why nothing goes in /etc or /var: each server gets a private temporary directory that holds
//! its config, pid file, logs and body temp files, so tests can run in parallel, the
//! system's nginx config (and its default site on :80) plays no part, and dropping the server
//! cleans up everything.
//!
//! Include it with `#[path = "support/nginx.rs"] mod nginx;`.

// Each including test crate uses a different subset of the API.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const NGINX: &str = "/usr/sbin/nginx";

/// An nginx child process. Dropping it kills nginx and removes its private directory.
pub struct Nginx {
    port: u16,
    child: Child,
    /// Holds nginx's config, pid, logs and temp files. Fields drop after `Drop::drop`, so this
    /// directory is removed only after the child is dead.
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx in the foreground as a child process, serving `root` on a free port of
    /// 127.0.0.1, and waits up to 10 s for it to listen. If it doesn't, this panics and the
    /// panic message includes nginx's error log.
    pub fn start(root: &Path) -> Nginx {
        // nginx resolves relative paths against its prefix (the private directory), not
        // against our working directory.
        let root = fs_err::canonicalize(root).unwrap();
        // The free port is found by binding port 0 and then releasing it, so another process
        // can grab it before nginx binds it. In that case, try again with a new port.
        for attempt in 1.. {
            match Nginx::try_start(&root) {
                Ok(nginx) => return nginx,
                Err(log) if attempt < 3 && log.contains("Address already in use") => {}
                Err(log) => panic!("{log}"),
            }
        }
        unreachable!()
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// nginx's error log (and anything it wrote to stderr), to attach to failure messages.
    pub fn log(&self) -> String {
        let read = |name| fs_err::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{}{}", read("error.log"), read("stderr.log"))
    }

    fn try_start(root: &Path) -> Result<Nginx, String> {
        let dir = tempfile::Builder::new().prefix("nginx-").tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = dir.path().join("nginx.conf");
        fs_err::write(&conf, config(dir.path(), root, port)).unwrap();
        let stderr = fs_err::File::create(dir.path().join("stderr.log")).unwrap();
        // `-e` makes nginx write even its earliest messages to our log. Without it, nginx
        // opens /var/log/nginx/error.log before it reads the config.
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr.into_parts().0)
            .spawn()
            .expect("nginx starts");
        let mut nginx = Nginx { port, child, dir };
        // nginx writes its pid file only after it has bound its socket. So a pid file plus an
        // accepted connection means nginx itself is listening, and not some other process
        // that took the port first.
        let pid = nginx.dir.path().join("nginx.pid");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if pid.exists() && TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(nginx);
            }
            if let Some(status) = nginx.child.try_wait().unwrap() {
                let log = nginx.log();
                return Err(format!(
                    "nginx exited ({status}) before listening on {port}:\n{log}"
                ));
            }
            if Instant::now() >= deadline {
                let log = nginx.log();
                return Err(format!(
                    "nginx did not listen on {port} within 10 s:\n{log}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The config of one server. Every file nginx writes goes under `dir`.
///
/// `daemon off` and `master_process off` run a single process: it is our child, so killing it
/// stops the server. Since that process never switches users, no `user` directive is needed
/// when running as root. `dav_methods PUT` with `create_full_put_path` accepts uploads into
/// new directories. `client_max_body_size 0` lifts the default 1 MB limit on uploads, so
/// large files can be uploaded.
fn config(dir: &Path, root: &Path, port: u16) -> String {
    let d = |name: &str| quoted(&dir.join(name));
    format!(
        "daemon off;\n\
         master_process off;\n\
         pid {pid};\n\
         error_log {error_log} warn;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n\
         \x20   access_log {access_log};\n\
         \x20   client_body_temp_path {client_body};\n\
         \x20   proxy_temp_path {proxy};\n\
         \x20   fastcgi_temp_path {fastcgi};\n\
         \x20   uwsgi_temp_path {uwsgi};\n\
         \x20   scgi_temp_path {scgi};\n\
         \x20   default_type application/octet-stream;\n\
         \x20   sendfile on;\n\
         \x20   server {{\n\
         \x20       listen 127.0.0.1:{port};\n\
         \x20       root {root};\n\
         \x20       client_max_body_size 0;\n\
         \x20       dav_methods PUT;\n\
         \x20       create_full_put_path on;\n\
         \x20       dav_access user:rw group:r all:r;\n\
         \x20   }}\n\
         }}\n",
        pid = d("nginx.pid"),
        error_log = d("error.log"),
        access_log = d("access.log"),
        client_body = d("client_body_temp"),
        proxy = d("proxy_temp"),
        fastcgi = d("fastcgi_temp"),
        uwsgi = d("uwsgi_temp"),
        scgi = d("scgi_temp"),
        root = quoted(root),
    )
}

/// A path as a quoted nginx config string. Paths that nginx would read differently inside
/// quotes (`"`, `\`) or that it would take as variables (`$`) are refused.
fn quoted(path: &Path) -> String {
    let s = path.to_str().expect("a UTF-8 path");
    assert!(
        !s.contains(['"', '\\', '$']),
        "path unusable in nginx config: {s}"
    );
    format!("\"{s}\"")
}
