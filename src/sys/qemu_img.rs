//! A thin wrapper over the `qemu-img` program.
//!
//! farm creates, rebases and converts qcow2 layers with the real `qemu-img` rather than a Rust
//! crate because no crate can write an overlay with a backing file (see DESIGN.md, "Facts about
//! the parts"), and because `qemu-img` is what every hypervisor host already has. Every function
//! here runs one command, waits for it, and turns a failure into an error that carries the
//! command line and the tail of its stderr, so the user can rerun it by hand.
//!
//! Relative backing paths are resolved by qemu relative to the directory of the image that
//! records them, not to the current directory.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

use serde::Deserialize;

use crate::model::build::qemu_img::{PROGRAM, QemuImg, parse_progress};

/// How many trailing lines of stderr an error keeps: enough for qemu's message, short enough to
/// read in a terminal.
const STDERR_TAIL_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum QemuImgError {
    #[error("The `{program}` program was not found on PATH\nhint: apt-get install qemu-utils")]
    NotInstalled { program: String },
    #[error("Could not run `{argv}`: {source}")]
    Spawn {
        argv: String,
        #[source]
        source: io::Error,
    },
    #[error("Command `{argv}` failed ({status}):\n{stderr}")]
    Failed {
        argv: String,
        status: ExitStatus,
        /// The last lines of what the command printed on stderr.
        stderr: String,
    },
    #[error("Command `{argv}` printed JSON that farm could not read: {source}")]
    BadOutput {
        argv: String,
        #[source]
        source: serde_json::Error,
    },
}

/// What `qemu-img info --output=json` says about one image. Only the fields farm uses are kept;
/// the rest of qemu's output is ignored so newer qemu versions keep working.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// The path as qemu opened it (for a backing image: joined onto the child's directory).
    pub filename: String,
    pub format: String,
    pub virtual_size: u64,
    pub actual_size: Option<u64>,
    pub cluster_size: Option<u64>,
    /// The backing path exactly as recorded in the image (relative stays relative).
    pub backing_filename: Option<String>,
    /// The backing path as qemu resolved it.
    pub full_backing_filename: Option<String>,
    pub backing_filename_format: Option<String>,
    pub dirty_flag: Option<bool>,
}

/// Creates a qcow2 overlay at `path` whose reads fall through to `backing`.
///
/// A relative `backing` is recorded as given and resolved from `path`'s directory, which is
/// what keeps a moved store valid. The backing format is always given (`-F qcow2`): since QEMU
/// 6.1 omitting it is an error, and probing it would be a security hole. `size` (bytes) grows
/// the overlay beyond the backing image's size; `None` keeps the backing's size.
pub fn create_overlay(path: &Path, backing: &Path, size: Option<u64>) -> Result<(), QemuImgError> {
    run(&QemuImg::CreateOverlay {
        disk: path,
        backing,
        size,
    })
    .map(drop)
}

/// Creates an empty qcow2 image of `size` bytes, with no backing file: a base layer.
pub fn create(path: &Path, size: u64) -> Result<(), QemuImgError> {
    run(&QemuImg::Create { disk: path, size }).map(drop)
}

/// Rewrites the backing path recorded in `path` to `new_backing` without touching data (`-u`).
///
/// Used to swap the absolute path a layer was built against for the relative one the store
/// keeps. It is only correct when both paths name the same bytes, which is the caller's promise.
pub fn rebase_unsafe(path: &Path, new_backing: &Path) -> Result<(), QemuImgError> {
    run(&QemuImg::RebaseUnsafe {
        disk: path,
        backing: new_backing,
    })
    .map(drop)
}

/// Moves `path` onto `new_backing`, copying into `path` every cluster its current backing
/// chain has that `new_backing` reads differently (`qemu-img rebase` in safe mode).
///
/// Squashes a chain: a top backed by checkpoints backed by a parent becomes one layer on
/// the parent. qemu compares only what the old chain allocated, so a sparse 8 GiB disk with a
/// few hundred MiB written takes about as long as copying those.
pub fn rebase_safe(path: &Path, new_backing: &Path) -> Result<(), QemuImgError> {
    run(&QemuImg::RebaseSafe {
        disk: path,
        backing: new_backing,
    })
    .map(drop)
}

/// Converts `src` (in `src_format`, e.g. `raw`, `qcow2`, `vmdk`) to a standalone qcow2 `dest`.
///
/// The format is always given so a raw image whose first bytes look like another format is not
/// misread. Any backing chain of `src` is flattened into `dest`.
pub fn convert_to_qcow2(src: &Path, src_format: &str, dest: &Path) -> Result<(), QemuImgError> {
    run(&QemuImg::ConvertToQcow2 {
        src,
        format: src_format,
        dest,
    })
    .map(drop)
}

/// Flattens the qcow2 chain of `src` into one standalone `dest` in `format` (see
/// `QemuImg::Export`).
///
/// `on_progress` is told how far qemu-img is, in percent, as it goes.
pub fn export(
    src: &Path,
    head: Option<&Path>,
    format: &str,
    compress: bool,
    dest: &Path,
    on_progress: &mut dyn FnMut(f64),
) -> Result<(), QemuImgError> {
    let op = QemuImg::Export {
        src,
        head,
        format,
        compress,
        progress: true,
        dest,
    };
    let mut line = Vec::new();
    run_streaming(OsStr::new(PROGRAM), &op.args(), &mut |bytes| {
        for &byte in bytes {
            if byte == b'\r' || byte == b'\n' {
                if let Some(percent) = parse_progress(&String::from_utf8_lossy(&line)) {
                    on_progress(percent);
                }
                line.clear();
            } else {
                line.push(byte);
            }
        }
    })
    .map(drop)
}

/// Describes one image, without following its backing chain.
///
/// `-U` (force-share) lets this read an image a running VM holds open: the answer may be a
/// moment stale, which is fine for metadata.
pub fn info(path: &Path) -> Result<ImageInfo, QemuImgError> {
    let op = QemuImg::Info { disk: path };
    parse_json(&op, &run(&op)?)
}

/// Describes `path` and every image below it, top first. It fails if any backing file cannot
/// be opened, so it doubles as a check that a chain resolves.
pub fn backing_chain(path: &Path) -> Result<Vec<ImageInfo>, QemuImgError> {
    let op = QemuImg::BackingChain { disk: path };
    parse_json(&op, &run(&op)?)
}

/// Checks a qcow2 image's metadata for corruption. Leaked clusters (status 3) waste space
/// but lose nothing, so they pass. `-U` lets it check a layer a running VM reads.
pub fn check(path: &Path) -> Result<(), QemuImgError> {
    match run(&QemuImg::Check { disk: path }) {
        Err(QemuImgError::Failed { status, .. }) if status.code() == Some(LEAKS_ONLY) => Ok(()),
        other => other.map(drop),
    }
}

/// `qemu-img check`'s status when the only finding is leaked clusters.
const LEAKS_ONLY: i32 = 3;

fn parse_json<T: serde::de::DeserializeOwned>(
    op: &QemuImg,
    stdout: &[u8],
) -> Result<T, QemuImgError> {
    serde_json::from_slice(stdout).map_err(|source| QemuImgError::BadOutput {
        argv: crate::model::shell::command_line(PROGRAM.as_ref(), &op.args()),
        source,
    })
}

/// Runs `qemu-img` for `op` and returns its stdout.
fn run(op: &QemuImg) -> Result<Vec<u8>, QemuImgError> {
    run_program(OsStr::new(PROGRAM), &op.args())
}

fn run_program<A: AsRef<OsStr>>(program: &OsStr, args: &[A]) -> Result<Vec<u8>, QemuImgError> {
    run_streaming(program, args, &mut |_| {})
}

/// Runs the program, showing `on_stdout` its output as it comes (qemu-img's `-p` progress),
/// and returns all of it.
fn run_streaming<A: AsRef<OsStr>>(
    program: &OsStr,
    args: &[A],
    on_stdout: &mut dyn FnMut(&[u8]),
) -> Result<Vec<u8>, QemuImgError> {
    use std::io::Read;
    let argv = || crate::model::shell::command_line(program, args);
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                QemuImgError::NotInstalled {
                    program: program.to_string_lossy().into_owned(),
                }
            } else {
                QemuImgError::Spawn {
                    argv: argv(),
                    source,
                }
            }
        })?;
    let spawn_error = |source| QemuImgError::Spawn {
        argv: argv(),
        source,
    };
    let mut stderr_pipe = child.stderr.take().expect("stderr is piped");
    let stderr = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr_pipe.read_to_end(&mut bytes);
        bytes
    });
    let mut stdout = Vec::new();
    if let Some(mut pipe) = child.stdout.take() {
        let mut chunk = [0u8; 4096];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    on_stdout(&chunk[..n]);
                    stdout.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(spawn_error(e)),
            }
        }
    }
    let status = child.wait().map_err(spawn_error)?;
    let stderr = stderr.join().unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        Err(QemuImgError::Failed {
            argv: argv(),
            status,
            stderr: stderr_tail(&stderr),
        })
    }
}

fn stderr_tail(stderr: &[u8]) -> String {
    crate::model::text::last_lines_of_bytes(stderr, STDERR_TAIL_LINES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_program_says_how_to_install_it() {
        let err = run_program(OsStr::new("qemu-img-does-not-exist-here"), &["info"]).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, QemuImgError::NotInstalled { .. }), "{msg}");
        assert!(msg.contains("hint: apt-get install qemu-utils"), "{msg}");
    }

    #[test]
    fn failing_command_error_names_argv_and_stderr() {
        let err = run_program(
            OsStr::new("sh"),
            &["-c", "echo one >&2; echo 'two words' >&2; exit 3"],
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sh -c 'echo one"), "{msg}");
        assert!(msg.ends_with("one\ntwo words"), "{msg}");
    }

    #[test]
    fn stderr_tail_keeps_last_lines() {
        let input: String = (0..30).map(|i| format!("line {i}\n")).collect();
        let tail = stderr_tail(input.as_bytes());
        assert_eq!(tail.lines().count(), STDERR_TAIL_LINES);
        assert!(tail.starts_with("line 10\n") && tail.ends_with("line 29"));
    }

    #[test]
    fn image_info_reads_qemu_json_and_ignores_unknown_fields() {
        let json = r#"{"virtual-size": 67108864, "filename": "c/child.qcow2",
            "cluster-size": 65536, "format": "qcow2", "actual-size": 200704,
            "full-backing-filename": "c/../base.qcow2", "backing-filename": "../base.qcow2",
            "backing-filename-format": "qcow2", "dirty-flag": false,
            "format-specific": {"type": "qcow2"}, "children": []}"#;
        let info: ImageInfo = serde_json::from_str(json).unwrap();
        assert_eq!(info.virtual_size, 64 << 20);
        assert_eq!(info.backing_filename.as_deref(), Some("../base.qcow2"));
        let base: ImageInfo =
            serde_json::from_str(r#"{"virtual-size": 1, "filename": "b", "format": "raw"}"#)
                .unwrap();
        assert_eq!(base.backing_filename, None);
    }
}
