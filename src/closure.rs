//! Closure push: before a hypervisor VM starts VMs of its own, the store entries they boot
//! from (each layer and every ancestor) are copied into that host's own store.
//!
//! The host's store has the local store's layout (`<root>/store/<key>-<name>/`), so the
//! relative backing paths written at commit resolve there unchanged. Content addressing
//! makes the push incremental: an entry whose `meta.json` is there is complete (it is renamed
//! into `store/` only after every file verified), so only missing entries move. Every file
//! is hashed while it is read for sending and read back by the host (`Host::blake3`); a
//! mismatch is retried and never renamed into the store.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::host::{Host, HostError};
use crate::model::hash::ContentHash;
use crate::progress::Reporter;
use crate::ssh::shell_quote;
use crate::store::{BOOT_DIR, DISK_FILE, Entry, META_FILE};

/// How many times one file is sent before a push gives up on it.
pub const PUSH_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("Cannot read `{}` from the local store: {source}", path.display())]
    Local {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "`{}` arrived on host `{host}` corrupted {attempts} times in a row (sent {sent}, the host read {received})\nhint: check the host's disk space and memory; nothing was added to its store",
        path.display()
    )]
    Corrupted {
        host: String,
        path: PathBuf,
        attempts: u32,
        sent: String,
        received: String,
    },
    #[error(
        "The local store entry `{}` does not match its own metadata (its disk hashes to {actual}, meta.json says {recorded})\nhint: run `farm store verify` and remove the damaged entry; farm builds it again",
        dir.display()
    )]
    LocalCorrupt {
        dir: PathBuf,
        actual: ContentHash,
        recorded: ContentHash,
    },
    #[error("{what} on host `{host}` failed (exit status {status:?}): {output}")]
    Command {
        host: String,
        what: &'static str,
        status: Option<i32>,
        output: String,
    },
}

/// The layout of farm's store on a host, mirroring the local one.
#[derive(Clone, Debug)]
pub struct HostStore {
    pub root: PathBuf,
}

impl HostStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The store under farm's directory `root` on a host reached over ssh.
    pub fn under(root: &Path) -> Self {
        Self::new(root.join("cache"))
    }

    /// Where a local entry lives on the host.
    pub fn entry_dir(&self, entry: &Entry) -> PathBuf {
        self.root.join("store").join(entry.dir_name())
    }

    /// A path inside the local store's `store/` directory (`local_entries`), translated to
    /// the host's copy of the same file.
    pub fn translate(&self, local_entries: &Path, local: &Path) -> PathBuf {
        let relative = local.strip_prefix(local_entries).unwrap_or(local);
        self.root.join("store").join(relative)
    }

    fn staging_dir(&self, entry: &Entry) -> PathBuf {
        self.root
            .join("tmp")
            .join(format!("{}.push", entry.dir_name()))
    }
}

/// What a push did, for status lines and benchmarks.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PushReport {
    /// Entries copied, by directory name.
    pub pushed: Vec<String>,
    /// Entries the host already had.
    pub present: usize,
    pub bytes: u64,
    /// Files sent again after a corrupted arrival.
    pub retries: u32,
    pub elapsed: Duration,
}

/// Copies `entries` (parents before children) into `store` on `host`, skipping those it
/// has, verifying every file.
pub fn push_closure(
    host: &dyn Host,
    store: &HostStore,
    entries: &[&Entry],
    reporter: &Reporter,
) -> Result<PushReport, PushError> {
    let started = Instant::now();
    let mut report = PushReport::default();
    for entry in entries {
        let target = store.entry_dir(entry);
        if host.get(&target.join(META_FILE))?.is_some() {
            report.present += 1;
            continue;
        }
        let files = entry_files(entry)?;
        let total: u64 = files.iter().map(|(_, len)| len).sum();
        let bar = reporter.bytes(entry.dir_name(), Some(total));
        let staging = store.staging_dir(entry);
        run(
            host,
            "Preparing the store",
            &format!(
                "rm -rf {s} && mkdir -p {s}/{BOOT_DIR} {store}",
                s = shell_quote(&staging.display().to_string()),
                store = shell_quote(&store.root.join("store").display().to_string())
            ),
        )?;
        for (path, _) in &files {
            let relative = path.strip_prefix(&entry.dir).unwrap_or(path);
            let remote = staging.join(relative);
            let sent = send_verified(host, path, &remote, &bar, &mut report.retries)?;
            if relative == Path::new(DISK_FILE) && sent != entry.meta.output_blake3 {
                return Err(PushError::LocalCorrupt {
                    dir: entry.dir.clone(),
                    actual: sent,
                    recorded: entry.meta.output_blake3,
                });
            }
        }
        bar.finish_and_clear();
        let meta = fs_err::read(entry.dir.join(META_FILE)).map_err(|source| PushError::Local {
            path: entry.dir.join(META_FILE),
            source,
        })?;
        // meta.json last, then one rename: a half-pushed entry is never seen as complete.
        host.put(&meta, &staging.join(META_FILE), 0o444)?;
        run(
            host,
            "Committing the pushed entry",
            &format!(
                "chmod -R a-w {s}/* && chmod 0555 {s} && rm -rf {t} && mv {s} {t}",
                s = shell_quote(&staging.display().to_string()),
                t = shell_quote(&target.display().to_string())
            ),
        )?;
        report.bytes += total;
        report.pushed.push(entry.dir_name().to_string());
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// The entry's disk and boot files (not meta.json) with their sizes.
fn entry_files(entry: &Entry) -> Result<Vec<(PathBuf, u64)>, PushError> {
    let mut paths = vec![entry.disk_path()];
    if let Some(boot) = entry.boot_dir() {
        let mut boot_files: Vec<PathBuf> = fs_err::read_dir(&boot)
            .map_err(|source| PushError::Local {
                path: boot.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        boot_files.sort();
        paths.extend(boot_files);
    }
    paths
        .into_iter()
        .map(|p| {
            let len = fs_err::metadata(&p)
                .map_err(|source| PushError::Local {
                    path: p.clone(),
                    source,
                })?
                .len();
            Ok((p, len))
        })
        .collect()
}

/// Sends one file until the host reads back what was sent; returns its blake3.
fn send_verified(
    host: &dyn Host,
    local: &Path,
    remote: &Path,
    bar: &indicatif::ProgressBar,
    retries: &mut u32,
) -> Result<ContentHash, PushError> {
    let mut last = None;
    for attempt in 1..=PUSH_ATTEMPTS {
        let position = bar.position();
        let mut file = fs_err::File::open(local).map_err(|source| PushError::Local {
            path: local.to_path_buf(),
            source,
        })?;
        let mut hasher = blake3::Hasher::new();
        host.put_stream(&mut file, remote, &mut |chunk| {
            hasher.update(chunk);
            bar.inc(chunk.len() as u64);
        })?;
        let sent = ContentHash::from_blake3(hasher.finalize());
        let received = host.blake3(remote)?;
        if received == Some(sent) {
            return Ok(sent);
        }
        if attempt < PUSH_ATTEMPTS {
            *retries += 1;
            bar.set_position(position);
        }
        last = Some((sent, received));
    }
    let (sent, received) = last.expect("at least one attempt");
    Err(PushError::Corrupted {
        host: host.name().to_string(),
        path: remote.to_path_buf(),
        attempts: PUSH_ATTEMPTS,
        sent: sent.to_string(),
        received: received.map_or_else(|| "nothing".to_string(), |h| h.to_string()),
    })
}

fn run(host: &dyn Host, what: &'static str, script: &str) -> Result<(), PushError> {
    let out = host.run(script)?;
    if !out.success() {
        return Err(PushError::Command {
            host: host.name().to_string(),
            what,
            status: out.status,
            output: out.text(),
        });
    }
    Ok(())
}
