//! A real OpenSSH server on 127.0.0.1 for tests that need a "remote" physical host: its own
//! host key, config and authorized_keys in a temporary directory, killed with the test.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SSHD: &str = "/usr/sbin/sshd";

pub struct Sshd {
    pub port: u16,
    /// The server's public host key, `ssh-ed25519 AAAA…`.
    pub host_public_key: String,
    child: Child,
    log: PathBuf,
}

impl Sshd {
    /// Starts sshd in `dir` on `port`, letting in `authorized_key` for any user (root here).
    pub fn start(dir: &Path, port: u16, authorized_key: &str) -> Sshd {
        let host_key = super::guest::keygen(dir, "sshd_host_key");
        fs_err::write(dir.join("authorized_keys"), format!("{authorized_key}\n")).unwrap();
        let config = dir.join("sshd_config");
        fs_err::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {key}\nPidFile {dir}/sshd.pid\n\
                 AuthorizedKeysFile {dir}/authorized_keys\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nAllowTcpForwarding yes\nAllowStreamLocalForwarding yes\n\
                 Subsystem sftp internal-sftp\nLogLevel VERBOSE\n",
                key = host_key.private.display(),
                dir = dir.display(),
            ),
        )
        .unwrap();
        // Privilege separation wants its empty directory.
        fs_err::create_dir_all("/run/sshd").unwrap();
        let log = dir.join("sshd.log");
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs_err::File::create(&log).unwrap().into_parts().0)
            .spawn()
            .expect("sshd starts");
        let sshd = Sshd {
            port,
            host_public_key: host_key.public,
            child,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not listen on 127.0.0.1:{port} within 10 s:\n{}",
                sshd.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        sshd
    }

    /// A known_hosts line for this server as ssh looks it up (`[127.0.0.1]:PORT`).
    pub fn known_hosts_line(&self) -> String {
        let key: Vec<&str> = self.host_public_key.split_whitespace().take(2).collect();
        format!("[127.0.0.1]:{} {}\n", self.port, key.join(" "))
    }

    pub fn log(&self) -> String {
        fs_err::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
