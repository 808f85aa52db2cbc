//! A minimal QMP client: enough to ask a guest to power down or qemu to quit, and to run a
//! command with arguments and read its answer (a build VM's disk snapshots).

use crate::model::shell::quote_path;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// The longest line farm reads from a QMP socket. qemu's answers to farm's commands are a
/// few KiB; the socket may be a hypervisor VM's, forwarded, so its bytes are not trusted.
const MAX_LINE: u64 = 1 << 20;

/// Reads one line of at most [`MAX_LINE`] bytes into `line` (cleared first); 0 at the end.
fn read_line(reader: &mut impl BufRead, line: &mut String) -> std::io::Result<usize> {
    line.clear();
    let n = reader.by_ref().take(MAX_LINE).read_line(line)?;
    if n as u64 == MAX_LINE && !line.ends_with('\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a line longer than {MAX_LINE} bytes"),
        ));
    }
    Ok(n)
}

/// What one line from qemu says about the command farm sent: `None` for anything else (an
/// event, or what is not JSON), the `return` value, or the error's description.
pub(crate) fn answer_of(line: &str) -> Option<Result<serde_json::Value, String>> {
    let mut answer = serde_json::from_str::<serde_json::Value>(line).ok()?;
    if let Some(value) = answer.get_mut("return") {
        return Some(Ok(value.take()));
    }
    let error = answer.get("error")?;
    Some(Err(error
        .get("desc")
        .and_then(|d| d.as_str())
        .unwrap_or("no description")
        .to_string()))
}

/// Sends `command` (e.g. `system_powerdown`, `quit`) after the capabilities handshake.
pub fn execute(socket: &Path, command: &str) -> std::io::Result<()> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = String::new();
    read_line(&mut reader, &mut line)?; // greeting
    writer.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
    read_line(&mut reader, &mut line)?;
    writer.write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())?;
    let _ = read_line(&mut reader, &mut line); // `quit` may close before answering
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP on `{socket}`: {source}")]
    Io {
        socket: String,
        source: std::io::Error,
    },
    #[error("QMP command `{command}` failed: {message}")]
    Command { command: String, message: String },
}

/// A QMP session on one qemu's socket, past the capabilities handshake.
pub struct Qmp {
    socket: String,
    /// How long an answer is awaited.
    timeout: Duration,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects and negotiates; every answer is awaited at most `timeout`.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let name = socket.display().to_string();
        let io = |source| QmpError::Io {
            socket: name.clone(),
            source,
        };
        let stream = UnixStream::connect(socket).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().map_err(io)?),
            writer: stream,
            socket: name.clone(),
            timeout,
        };
        let mut greeting = String::new();
        read_line(&mut qmp.reader, &mut greeting).map_err(io)?;
        qmp.command("qmp_capabilities", serde_json::json!({}))?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` and returns its `return` value; events that arrive
    /// meanwhile are skipped.
    pub fn command(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, QmpError> {
        let request = serde_json::json!({ "execute": command, "arguments": arguments });
        let io = |source| QmpError::Io {
            socket: self.socket.clone(),
            source,
        };
        self.writer
            .write_all(format!("{request}\n").as_bytes())
            .map_err(io)?;
        // Events may come first, but not for ever: the answer is awaited at most
        // `timeout` in all, however the lines trickle in.
        let deadline = Instant::now() + self.timeout;
        let mut line = String::new();
        loop {
            if read_line(&mut self.reader, &mut line).map_err(io)? == 0 {
                return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            match answer_of(&line) {
                Some(Ok(value)) => return Ok(value),
                Some(Err(message)) => {
                    return Err(QmpError::Command {
                        command: command.to_string(),
                        message,
                    });
                }
                None if Instant::now() > deadline => {
                    return Err(io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer to `{command}` within {:?}", self.timeout),
                    )));
                }
                None => {}
            }
        }
    }
}

/// A migration target that writes qemu's machine state, compressed, to `path`. zstd's
/// fast level 3: loading is most of a restore, and zstd decompresses it in 0.77 s against
/// 1.12 s at level 1 (the bundle's L1, 1 GiB of memory state), for a file a quarter larger
/// (434 MiB against 347 MiB); the bundle's restore went from 3.6-3.9 s to 3.1-3.5 s.
pub fn save_command(path: &Path) -> String {
    format!("zstd --fast=3 -q -T2 -o {}", quote_path(path))
}

/// The migration source that reads a state [`save_command`] wrote.
pub fn load_command(path: &Path) -> String {
    format!("zstd -d -q -c {}", quote_path(path))
}

/// Pauses a VM whose machine state is about to be saved, first undoing what a save that was
/// killed may have left: a migration still running is cancelled, and a VM that qemu holds in
/// `postmigrate` (a finished migration, its disks handed over) runs again, since qemu
/// refuses to migrate it a second time; so does one qemu paused on a full disk
/// (`io-error`), once there is room. A VM already paused stays paused.
pub fn pause_for_migration(qmp: &mut Qmp, timeout: Duration) -> Result<(), String> {
    let ongoing = |qmp: &mut Qmp| -> Result<bool, String> {
        let info = qmp
            .command("query-migrate", serde_json::json!({}))
            .map_err(|e| e.to_string())?;
        Ok(!matches!(
            info["status"].as_str(),
            None | Some("none" | "completed" | "failed" | "cancelled")
        ))
    };
    if ongoing(qmp)? {
        qmp.command("migrate_cancel", serde_json::json!({}))
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + timeout;
        while ongoing(qmp)? {
            if Instant::now() > deadline {
                return Err(format!(
                    "an earlier migration was still running {} s after it was cancelled",
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // qemu refuses to migrate a VM in `postmigrate` again; one it paused on a full disk
    // (`io-error`) would be saved paused on that error. Resumed, `cont` retrying the write.
    if let Held::StillFull(_) = resume_held(qmp, &["postmigrate", "io-error"])? {
        return Err("qemu holds the VM paused: a write to its disk found no space\nhint: free space on the filesystem that holds its overlay (`farm status` names it), then save again".into());
    }
    qmp.command("stop", serde_json::json!({}))
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The run state qemu reports (`running`, `paused`, `postmigrate`, `io-error`, …).
pub fn run_state(qmp: &mut Qmp) -> Result<String, String> {
    qmp.command("query-status", serde_json::json!({}))
        .map(|s| s["status"].as_str().unwrap_or_default().to_string())
        .map_err(|e| e.to_string())
}

/// What [`resume_held`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Held {
    /// The VM was in none of the states asked about; nothing was done.
    No,
    /// It was held in this state, and runs again.
    Resumed(String),
    /// It was held in this state, was resumed, and qemu paused it again at once on a full
    /// disk (`io-error`).
    StillFull(String),
}

/// Resumes a VM qemu holds in one of `states`. A guest whose disk is still full pauses again
/// at its next write, so the state is read once more half a second after `cont`.
pub fn resume_held(qmp: &mut Qmp, states: &[&str]) -> Result<Held, String> {
    let was = run_state(qmp)?;
    if !states.contains(&was.as_str()) {
        return Ok(Held::No);
    }
    qmp.command("cont", serde_json::json!({}))
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(match run_state(qmp)?.as_str() {
        "io-error" => Held::StillFull(was),
        _ => Held::Resumed(was),
    })
}

/// qemu says a migration is `completed` a moment before the VM leaves `finish-migrate`,
/// and refuses `cont` until it has ("Migration is not finalized yet": a build once failed
/// so under load). Waits for that moment to pass.
fn wait_past_finish_migrate(qmp: &mut Qmp, deadline: Instant) -> Result<(), String> {
    loop {
        if run_state(qmp)? != "finish-migrate" {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the VM was still finishing its migration at the deadline".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `query` until the migration completes; its error or a timeout otherwise.
pub fn wait_for_migration(qmp: &mut Qmp, query: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let info = qmp
            .command(query, serde_json::json!({}))
            .map_err(|e| e.to_string())?;
        match info["status"].as_str() {
            Some("completed") => return wait_past_finish_migrate(qmp, deadline),
            Some("failed") | Some("cancelled") => {
                return Err(format!(
                    "the migration {}: {}",
                    info["status"],
                    info["error-desc"].as_str().unwrap_or("no reason given")
                ));
            }
            _ if Instant::now() > deadline => {
                return Err(format!("the migration took over {} s", timeout.as_secs()));
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A QMP socket that greets, then does what `serve` does with each connection.
    fn hostile(serve: fn(UnixStream)) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            if let Ok((stream, _)) = listener.accept() {
                serve(stream);
            }
        });
        (dir, path)
    }

    #[test]
    fn a_socket_that_never_answers_times_out() {
        let (_dir, path) = hostile(|stream| {
            std::thread::sleep(Duration::from_secs(30));
            drop(stream);
        });
        let started = Instant::now();
        let err = Qmp::connect(&path, Duration::from_millis(300))
            .err()
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(5), "{err}");
        assert!(err.to_string().starts_with("QMP on `"), "{err}");
    }

    #[test]
    fn events_forever_do_not_hold_a_command_past_its_timeout() {
        let (_dir, path) = hostile(|mut stream| {
            let _ = stream.write_all(b"{\"QMP\": {}}\n");
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = stream.write_all(b"{\"return\": {}}\n");
            // Then an event every 50 ms, and never an answer.
            for _ in 0..400 {
                if stream
                    .write_all(b"{\"event\": \"STOP\", \"timestamp\": {}}\n")
                    .is_err()
                {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let mut qmp = Qmp::connect(&path, Duration::from_millis(500)).unwrap();
        let started = Instant::now();
        let err = qmp
            .command("query-status", serde_json::json!({}))
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "{err}");
        assert!(
            err.to_string().contains("no answer to `query-status`"),
            "{err}"
        );
    }

    #[test]
    fn a_line_without_end_is_refused_at_its_bound() {
        let (_dir, path) = hostile(|mut stream| {
            let chunk = vec![b'x'; 64 << 10];
            for _ in 0..32 {
                if stream.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
        let err = Qmp::connect(&path, Duration::from_secs(5)).err().unwrap();
        assert!(err.to_string().contains("a line longer than"), "{err}");
    }

    /// A real qemu (no disk, no guest) left as a killed save leaves it: once in the middle of
    /// a migration, once paused after one. Each time the next save's pause readies it for
    /// `migrate`, which qemu would otherwise refuse.
    #[test]
    fn a_save_killed_mid_migration_leaves_nothing_the_next_save_cannot_undo() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        /// Kills qemu however the test ends.
        struct Killed(std::process::Child);
        impl Drop for Killed {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let _qemu = Killed(
            std::process::Command::new("qemu-system-x86_64")
                .args([
                    "-machine",
                    "pc",
                    "-accel",
                    "tcg",
                    "-nodefaults",
                    "-display",
                    "none",
                ])
                .args(["-m", "32", "-qmp"])
                .arg(format!("unix:{},server=on,wait=off", socket.display()))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("qemu-system-x86_64 runs (scripts/setup.sh installs it)"),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut qmp = Qmp::connect(&socket, Duration::from_secs(10)).unwrap();
        let status = |qmp: &mut Qmp| {
            qmp.command("query-status", serde_json::json!({})).unwrap()["status"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let migrate = |qmp: &mut Qmp, command: &str| {
            qmp.command(
                "migrate",
                serde_json::json!({ "uri": format!("exec:{command}") }),
            )
        };
        let state = dir.path().join("state");

        // A migration held to 4 KiB/s: it is still running, as when farm is killed while
        // zstd writes the state.
        qmp.command("stop", serde_json::json!({})).unwrap();
        let bandwidth = |qmp: &mut Qmp, bytes: u64| {
            qmp.command(
                "migrate-set-parameters",
                serde_json::json!({ "max-bandwidth": bytes }),
            )
            .unwrap();
        };
        bandwidth(&mut qmp, 4096);
        migrate(&mut qmp, "cat >/dev/null").unwrap();
        let ongoing = qmp.command("query-migrate", serde_json::json!({})).unwrap();
        assert!(
            ["setup", "active"].contains(&ongoing["status"].as_str().unwrap_or("")),
            "{ongoing}"
        );
        pause_for_migration(&mut qmp, Duration::from_secs(20)).unwrap();
        assert_eq!(status(&mut qmp), "paused");
        bandwidth(&mut qmp, 1 << 30);

        // A migration that finished: qemu holds the VM in `postmigrate`, and refuses another.
        migrate(&mut qmp, &save_command(&state)).unwrap();
        wait_for_migration(&mut qmp, "query-migrate", Duration::from_secs(60)).unwrap();
        assert_eq!(status(&mut qmp), "postmigrate");
        let refused = migrate(&mut qmp, &save_command(&state)).unwrap_err();
        assert!(
            refused.to_string().contains("previous migration"),
            "{refused}"
        );

        pause_for_migration(&mut qmp, Duration::from_secs(20)).unwrap();
        assert_eq!(status(&mut qmp), "paused");
        migrate(&mut qmp, &save_command(&state)).unwrap();
        wait_for_migration(&mut qmp, "query-migrate", Duration::from_secs(60)).unwrap();
        assert!(fs_err::metadata(&state).unwrap().len() > 0);
    }
}
