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

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread (call it first in `main`, so
/// every later thread inherits the mask) and handles them on a thread of their own: stop
/// the helpers, say so, exit 128 + signal. Children get an empty mask (std resets it).
pub fn handle_interrupts() {
    // SAFETY: plain libc calls on a sigset_t owned by this function.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return;
        }
        set
    };
    let _ = std::thread::Builder::new()
        .name("farm-signals".into())
        .spawn(move || {
            let mut signal: libc::c_int = 0;
            // SAFETY: sigwait on the set blocked above.
            if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                return;
            }
            eprintln!(
                "\nfarm: interrupted; stopping its ssh connections (VMs already started keep running; `farm up` picks up from here)"
            );
            stop_helpers();
            std::process::exit(128 + signal);
        });
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
}
