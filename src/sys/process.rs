//! Helper processes that must never outlive farm (ssh ControlMasters), and what farm does
//! when it is interrupted.
//!
//! A helper is started by one long-lived thread with `PR_SET_PDEATHSIG`, so the kernel
//! stops it when farm exits for any reason, even SIGKILL (the signal follows the thread
//! that forked, hence the dedicated thread: a worker thread that ends would take its
//! helpers with it). Helpers stay in farm's process group, so a Ctrl-C reaches them too.
//! On SIGINT, SIGTERM or SIGHUP farm stops every registered helper, removes the files they
//! leave (control sockets), and exits 128 + the signal: what it already committed stays,
//! nothing half-made does (the store commits by rename), and the next `farm up` converges.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Mutex, OnceLock};

type SpawnRequest = (Command, Sender<io::Result<Child>>);

/// Registered helpers: pid → a directory to remove when farm is interrupted.
static HELPERS: Mutex<BTreeMap<u32, Option<PathBuf>>> = Mutex::new(BTreeMap::new());
static SPAWNER: OnceLock<Mutex<Sender<SpawnRequest>>> = OnceLock::new();

fn spawner() -> Sender<SpawnRequest> {
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = channel::<SpawnRequest>();
            std::thread::Builder::new()
                .name("farm-spawner".into())
                .spawn(move || {
                    for (mut command, reply) in rx {
                        let _ = reply.send(command.spawn());
                    }
                })
                .expect("a thread for helper processes");
            Mutex::new(tx)
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Starts `command` as a helper that dies with farm; `leaves` is removed with it when farm
/// is interrupted. Call [`release`] after stopping it.
pub fn spawn_helper(mut command: Command, leaves: Option<PathBuf>) -> io::Result<Child> {
    // SAFETY: prctl is async-signal-safe and touches only the forked child.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (tx, rx) = channel();
    spawner()
        .send((command, tx))
        .map_err(|_| io::Error::other("the helper spawner thread is gone"))?;
    let child = rx
        .recv()
        .map_err(|_| io::Error::other("the helper spawner thread is gone"))??;
    HELPERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(child.id(), leaves);
    Ok(child)
}

/// Forgets a helper farm has stopped itself.
pub fn release(pid: u32) {
    HELPERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&pid);
}

/// Stops every registered helper and removes what they leave behind.
pub fn stop_helpers() {
    let helpers = std::mem::take(&mut *HELPERS.lock().unwrap_or_else(|e| e.into_inner()));
    for (pid, leaves) in helpers {
        // SAFETY: kill(2) on a pid farm started and has not reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        if let Some(dir) = leaves {
            let _ = fs_err::remove_dir_all(dir);
        }
    }
}

/// Where the signal handler writes the signal it caught (a pipe's write end).
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signal: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = signal as u8;
        // SAFETY: write(2) is async-signal-safe; the buffer is a local byte.
        unsafe {
            libc::write(fd, (&byte as *const u8).cast(), 1);
        }
    }
}

/// For commands that only print: end quietly when the reader of stdout goes away
/// (`farm show p | head`), as Unix tools do, instead of panicking inside `println!`. Not for
/// commands that write to their children's pipes, which must see `EPIPE` as an error.
pub fn exit_quietly_on_closed_stdout() {
    // SAFETY: restoring the default disposition of one signal; no handler runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Handles SIGINT, SIGTERM and SIGHUP: a handler passes the signal through a pipe to a
/// thread of its own, which stops the helpers, says so, and exits 128 + signal. Handlers
/// (unlike a blocked signal mask) are not inherited across exec: qemu, ssh and the tools
/// farm runs keep the default reaction to these signals.
pub fn handle_interrupts() {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two descriptors; O_CLOEXEC keeps them out of children.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    let [read_end, write_end] = fds;
    SIGNAL_PIPE.store(write_end, Ordering::Relaxed);
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with a plain handler; SA_RESTART keeps other threads'
        // system calls from failing with EINTR.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
    let _ = std::thread::Builder::new()
        .name("farm-signals".into())
        .spawn(move || {
            let mut byte = 0u8;
            // SAFETY: read(2) into a local byte from the pipe made above.
            while unsafe { libc::read(read_end, (&mut byte as *mut u8).cast(), 1) } != 1 {}
            eprintln!(
                "\nfarm: interrupted; stopping its ssh connections (VMs already started keep running; `farm up` picks up from here)"
            );
            stop_helpers();
            std::process::exit(128 + i32::from(byte));
        });
}

/// What a command run with [`output_within`] printed, and how it ended: `None` when it was
/// killed at the limit.
pub struct LimitedOutput {
    pub status: Option<std::process::ExitStatus>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// How long what a finished command printed may take to arrive: a process it left behind
/// can hold its pipes open (an ssh ControlMaster it started, waiting on a dead connection),
/// and its output is whatever came until then.
const PIPES_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs `command` (its stdout and stderr piped by the caller) for at most `limit`, then
/// kills it: a wait on a connection that hangs ends on time.
pub fn output_within(
    mut command: Command,
    limit: std::time::Duration,
) -> io::Result<LimitedOutput> {
    use std::io::Read;
    use std::sync::{Arc, Mutex, mpsc};
    let mut child = command.spawn()?;
    let (done, finished) = mpsc::channel::<()>();
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let kept = bytes.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            if let Some(mut pipe) = pipe {
                let mut chunk = [0u8; 8192];
                while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                    kept.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&chunk[..n]);
                }
            }
            let _ = done.send(());
        });
        bytes
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    drop(done);
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let grace = std::time::Instant::now() + PIPES_GRACE;
    for _ in 0..2 {
        let left = grace.saturating_duration_since(std::time::Instant::now());
        if finished.recv_timeout(left).is_err() {
            break;
        }
    }
    let take = |bytes: Arc<Mutex<Vec<u8>>>| {
        std::mem::take(&mut *bytes.lock().unwrap_or_else(|e| e.into_inner()))
    };
    Ok(LimitedOutput {
        status,
        stdout: take(stdout),
        stderr: take(stderr),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_are_registered_until_released_and_can_be_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let leaves = dir.path().join("ctl");
        fs_err::create_dir_all(&leaves).unwrap();
        let mut command = Command::new("sleep");
        command.arg("30");
        let mut child = spawn_helper(command, Some(leaves.clone())).unwrap();
        assert!(HELPERS.lock().unwrap().contains_key(&child.id()));
        stop_helpers();
        let status = child.wait().unwrap();
        assert!(!status.success(), "stopped by a signal: {status:?}");
        assert!(!leaves.exists());
        release(child.id());
        assert!(!HELPERS.lock().unwrap().contains_key(&child.id()));
    }

    #[test]
    fn output_comes_back_though_a_process_left_behind_holds_the_pipes() {
        let mut command = Command::new("sh");
        command
            .args(["-c", "echo said; sleep 30 & exit 4"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let started = std::time::Instant::now();
        let out = output_within(command, std::time::Duration::from_secs(20)).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        assert_eq!(out.status.and_then(|s| s.code()), Some(4));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "said\n");
    }
}
