//! What both image builders (Debian from a mirror, farm's tiny image) share: one way to run
//! an outside tool with its command line and whole output in the build log, errors quoting
//! its last lines and a hint; scratch paths removed on every exit; and the size of a tree.

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use crate::build::tool_log::{LogError, ToolLog};
use crate::model::build::qemu_img::QemuImg;
use crate::model::shell::command_line;
use crate::sys::programs::{debian_package, find_program};

/// How many trailing output lines an error quotes: enough for the tool's complaint, short
/// enough to read in a terminal. The whole output is in the log.
const TAIL_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("The `{tool}` program was not found on PATH\nhint: apt-get install {package}")]
    Missing { tool: String, package: String },
    #[error("Could not run `{tool}`: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "The `{tool}` command failed ({status}); its last lines follow, the full output is in `{log}`:\n{tail}\nhint: {hint}"
    )]
    Failed {
        tool: String,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
        hint: String,
    },
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Fails with `Missing` (naming the package) unless every tool is installed.
pub fn require(tools: &[&str]) -> Result<(), ToolError> {
    match tools.iter().find(|t| find_program(t).is_none()) {
        Some(tool) => Err(ToolError::Missing {
            tool: tool.to_string(),
            package: debian_package(tool).to_string(),
        }),
        None => Ok(()),
    }
}

/// The build log with the way tools are run into it.
pub struct ToolRunner {
    log: ToolLog,
}

impl ToolRunner {
    /// Appends to the log at `path`, creating it.
    pub fn open(path: &Path) -> Result<Self, LogError> {
        Ok(Self {
            log: ToolLog::open(path)?,
        })
    }

    /// A line of farm's own between the tools' output.
    pub fn note(&self, text: &str) -> Result<(), LogError> {
        self.log.note(text)
    }

    /// `tool`, found on PATH (or in the sbin directories).
    pub fn tool(&self, tool: &str) -> Invocation<'_> {
        Invocation {
            runner: self,
            tool: tool.to_string(),
            program: None,
            args: Vec::new(),
            cwd: None,
            on_line: None,
            hint: None,
        }
    }

    /// A program at `path` (one just unpacked), called `tool` in the log and errors.
    pub fn program(&self, path: &Path, tool: &str) -> Invocation<'_> {
        Invocation {
            program: Some(path.to_path_buf()),
            ..self.tool(tool)
        }
    }
}

/// Sees every output line of a tool as it comes.
type LineObserver<'a> = Box<dyn Fn(&str) + Sync + 'a>;

/// One run of a tool, described, then `run`.
pub struct Invocation<'a> {
    runner: &'a ToolRunner,
    tool: String,
    program: Option<PathBuf>,
    args: Vec<OsString>,
    cwd: Option<PathBuf>,
    on_line: Option<LineObserver<'a>>,
    hint: Option<Box<dyn FnOnce() -> String + 'a>>,
}

impl<'a> Invocation<'a> {
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn cwd(mut self, dir: &Path) -> Self {
        self.cwd = Some(dir.to_path_buf());
        self
    }

    /// Sees every output line (stdout and stderr) as it comes: progress messages.
    pub fn on_line(mut self, f: impl Fn(&str) + Sync + 'a) -> Self {
        self.on_line = Some(Box::new(f));
        self
    }

    /// What the error tells the user to do when the tool fails.
    pub fn hint(mut self, f: impl FnOnce() -> String + 'a) -> Self {
        self.hint = Some(Box::new(f));
        self
    }

    /// Runs the tool with `LC_ALL=C.UTF-8`, streaming its output into the log line by line;
    /// returns its stdout. On failure the error quotes the last lines and the hint.
    pub fn run(self) -> Result<String, ToolError> {
        let tool = self.tool.clone();
        let program = match &self.program {
            Some(path) => path.clone(),
            None => find_program(&tool).ok_or_else(|| ToolError::Missing {
                tool: tool.clone(),
                package: debian_package(&tool).to_string(),
            })?,
        };
        let log = &self.runner.log;
        let command_line = command_line(program.as_os_str(), &self.args);
        log.note(&format!("$ {command_line}"))?;
        let started = Instant::now();
        let spawn_error = |source| ToolError::Spawn {
            tool: tool.clone(),
            source,
        };
        let mut command = Command::new(&program);
        command
            .args(&self.args)
            .env("LC_ALL", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(cwd) = &self.cwd {
            command.current_dir(cwd);
        }
        let mut child = command.spawn().map_err(spawn_error)?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let tail = Mutex::new(VecDeque::with_capacity(TAIL_LINES));
        let on_line = self.on_line.as_deref();
        let pump = |stream: &mut dyn Read, keep: Option<&mut Vec<u8>>| -> Result<(), ToolError> {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            let mut keep = keep;
            loop {
                line.clear();
                let read = reader.read_until(b'\n', &mut line).map_err(spawn_error)?;
                if read == 0 {
                    return Ok(());
                }
                log.write(&line)?;
                if let Some(kept) = keep.as_deref_mut() {
                    kept.extend_from_slice(&line);
                }
                let text = String::from_utf8_lossy(&line).trim_end().to_string();
                if let Some(f) = on_line {
                    f(&text);
                }
                let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(text);
            }
        };
        let mut captured = Vec::new();
        let (out, err) = std::thread::scope(|scope| {
            let out = scope.spawn(|| pump(&mut { stdout }, Some(&mut captured)));
            let err = pump(&mut { stderr }, None);
            (out.join().expect("log pump panicked"), err)
        });
        let status = child.wait().map_err(spawn_error)?;
        log.note(&format!(
            "{tool}: {status} after {:.1} s",
            started.elapsed().as_secs_f64()
        ))?;
        out?;
        err?;
        if status.success() {
            return Ok(String::from_utf8_lossy(&captured).into_owned());
        }
        let tail = tail.into_inner().unwrap_or_else(|e| e.into_inner());
        Err(ToolError::Failed {
            tool,
            status,
            log: log.path().to_path_buf(),
            tail: Vec::from(tail).join("\n"),
            hint: self.hint.map_or_else(String::new, |h| h()),
        })
    }
}

/// How long each half of [`ToolRunner::ext4_qcow2`] took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskTimes {
    pub mkfs: std::time::Duration,
    pub convert: std::time::Duration,
}

impl ToolRunner {
    /// Turns the tree `rootfs` into `disk` (qcow2) holding one ext4 filesystem labelled
    /// `farm-root` of `virtual_bytes`, without mounting anything: `mkfs.ext4 -d` into the
    /// sparse raw file `raw`, then `qemu-img convert`. Both image builders end this way.
    pub fn ext4_qcow2(
        &self,
        rootfs: &Path,
        raw: &Path,
        disk: &Path,
        virtual_bytes: u64,
        progress: &indicatif::ProgressBar,
    ) -> Result<DiskTimes, ToolError> {
        let io = |source: io::Error| ToolError::Spawn {
            tool: "mkfs.ext4".into(),
            source,
        };
        let phase = Instant::now();
        // A sparse file: only the blocks mkfs writes take space.
        fs_err::File::create(raw)
            .and_then(|f| f.set_len(virtual_bytes))
            .map_err(io)?;
        self.tool("mkfs.ext4")
            .args(["-F", "-q", "-L", "farm-root", "-d"])
            .args([rootfs, raw])
            .hint(|| format!("check free space for `{}`", raw.display()))
            .run()?;
        let mkfs = phase.elapsed();
        progress.set_message("qemu-img convert to qcow2");
        let phase = Instant::now();
        let convert = QemuImg::ConvertToQcow2 {
            src: raw,
            format: "raw",
            dest: disk,
        };
        self.tool(crate::model::build::qemu_img::PROGRAM)
            .args(convert.args())
            .hint(|| {
                format!(
                    "check free space in `{}`",
                    disk.parent().unwrap_or(disk).display()
                )
            })
            .run()?;
        Ok(DiskTimes {
            mkfs,
            convert: phase.elapsed(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    #[error(
        "Refusing to delete `{path}`: `{mount}` is still mounted inside it (left by an interrupted build)\nhint: umount -R {path}, then delete it"
    )]
    StillMounted { path: PathBuf, mount: PathBuf },
    /// File system errors; `fs_err` puts the path in the message.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Scratch paths inside a staging directory, removed on success and on every error path.
pub struct Scratch {
    dirs: Vec<PathBuf>,
    files: Vec<PathBuf>,
}

impl Scratch {
    pub fn new(dirs: Vec<PathBuf>, files: Vec<PathBuf>) -> Self {
        Self { dirs, files }
    }

    /// Scratch directories and files named inside `out_dir` (created if missing), with any
    /// leftovers of an interrupted build removed first.
    pub fn fresh(out_dir: &Path, dirs: &[&str], files: &[&str]) -> Result<Self, ScratchError> {
        fs_err::create_dir_all(out_dir)?;
        let scratch = Self::new(
            dirs.iter().map(|d| out_dir.join(d)).collect(),
            files.iter().map(|f| out_dir.join(f)).collect(),
        );
        scratch.remove()?;
        Ok(scratch)
    }

    pub fn remove(&self) -> Result<(), ScratchError> {
        for dir in &self.dirs {
            if fs_err::symlink_metadata(dir).is_err() {
                continue;
            }
            // mmdebstrap bind-mounts the host's /dev, /proc and /sys into its tree; if it was
            // killed they may still be there, and deleting through them would delete the
            // host's device nodes.
            if crate::sys::mounts::detach_mounts_under(dir).is_err() {
                let mount = crate::sys::mounts::mounts_under(dir)?
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| dir.clone());
                return Err(ScratchError::StillMounted {
                    path: dir.clone(),
                    mount,
                });
            }
            fs_err::remove_dir_all(dir)?;
        }
        for file in &self.files {
            match fs_err::remove_file(file) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

/// Bytes allocated under `root` (like `du`), hard links counted once, symlinks not followed.
pub fn tree_bytes(root: &Path) -> io::Result<u64> {
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs_err::symlink_metadata(&path)?;
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total += meta.blocks() * 512;
        if meta.is_dir() {
            for entry in fs_err::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_tool_quotes_its_tail_and_hint_and_output_is_logged() {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("build.log");
        let runner = ToolRunner::open(&log_path).unwrap();
        let out = runner
            .tool("sh")
            .args(["-c", "echo to-stdout; echo to-stderr >&2"])
            .run()
            .unwrap();
        assert_eq!(out, "to-stdout\n");
        let err = runner
            .tool("sh")
            .args(["-c", "echo 'it broke' >&2; exit 3"])
            .hint(|| "do something".into())
            .run()
            .unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with("The `sh` command failed (exit status: 3)"),
            "{message}"
        );
        assert!(message.contains("\nit broke\n"), "{message}");
        assert!(message.ends_with("\nhint: do something"), "{message}");
        let logged = fs_err::read_to_string(&log_path).unwrap();
        assert!(
            logged.contains("to-stderr") && logged.contains("'echo to-stdout; echo to-stderr >&2'"),
            "{logged}"
        );
        assert!(logged.contains("sh: exit status: 3 after"), "{logged}");
        let missing = runner.tool("no-such-tool-farm").run().unwrap_err();
        assert!(matches!(missing, ToolError::Missing { .. }), "{missing}");
    }

    #[test]
    fn scratch_paths_go_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let (tree, file) = (dir.path().join("tree"), dir.path().join("raw"));
        fs_err::create_dir_all(tree.join("a/b")).unwrap();
        fs_err::write(&file, b"x").unwrap();
        drop(Scratch::new(vec![tree.clone()], vec![file.clone()]));
        assert!(!tree.exists() && !file.exists());
    }
}
