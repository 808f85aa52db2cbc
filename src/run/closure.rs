//! Closure push: before a hypervisor VM starts VMs of its own, the store entries they boot
//! from (each layer and every ancestor) are copied into that host's own store.
//!
//! The host's store has the local store's layout (`<root>/store/<key>-<name>/`), so the
//! relative backing paths written at commit resolve there unchanged. Content addressing
//! makes the push incremental: an entry whose `meta.json` is there is complete (it is renamed
//! into `store/` only after every file verified), so only missing entries move.
//!
//! Each entry travels as one tar stream into one shell script on the host, which unpacks
//! it into a staging directory, reads every file back with `b3sum --check` against the
//! hashes farm sends with it (the disk's from the entry's metadata), and only then renames
//! it into the store. One round trip per entry: on a hypervisor VM under TCG each command
//! costs a noticeable fraction of a second, so per-file commands would dominate small
//! closures. A mismatch or a broken stream is sent again and never renamed into the store.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::model::hash::ContentHash;
use crate::progress::Reporter;
use crate::run::host::{Host, HostError};
use crate::store::{DISK_FILE, Entry, META_FILE};
use crate::sys::ssh::shell_quote;

/// How many times one entry is sent before a push gives up on it.
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
        "`{}` arrived on host `{host}` corrupted {attempts} times in a row; the last check said:\n{report}\nhint: check the host's disk space and memory; nothing was added to its store",
        dir.display()
    )]
    Corrupted {
        host: String,
        dir: PathBuf,
        attempts: u32,
        report: String,
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
    let present = complete_entries(host, store, entries)?;
    for entry in entries {
        if present.contains(entry.dir_name()) {
            report.present += 1;
            continue;
        }
        let files = entry_files(entry)?;
        let total: u64 = files.iter().map(|f| f.len).sum();
        let bar = reporter.bytes(entry.dir_name(), Some(archive_len(&files)));
        let mut attempt = 1;
        loop {
            let position = bar.position();
            let check = match send_entry(host, store, entry, &files, &bar)? {
                Sent::Committed => break,
                Sent::Rejected(check) => check,
            };
            // The host checks the disk against the entry's metadata: when that fails, the
            // local copy may be the damaged one, and sending it again cannot help.
            if check.contains(DISK_FILE) {
                check_local_disk(entry)?;
            }
            if attempt == PUSH_ATTEMPTS {
                return Err(PushError::Corrupted {
                    host: host.name().to_string(),
                    dir: store.entry_dir(entry),
                    attempts: PUSH_ATTEMPTS,
                    report: check,
                });
            }
            attempt += 1;
            report.retries += 1;
            bar.set_position(position);
        }
        bar.finish_and_clear();
        report.bytes += total;
        report.pushed.push(entry.dir_name().to_string());
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Fails with `LocalCorrupt` when the local disk no longer hashes to its metadata.
fn check_local_disk(entry: &Entry) -> Result<(), PushError> {
    let path = entry.disk_path();
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_reader(
            fs_err::File::open(&path).map_err(|source| PushError::Local {
                path: path.clone(),
                source,
            })?,
        )
        .map_err(|source| PushError::Local { path, source })?;
    let actual = ContentHash::from_blake3(hasher.finalize());
    if actual != entry.meta.output_blake3 {
        return Err(PushError::LocalCorrupt {
            dir: entry.dir.clone(),
            actual,
            recorded: entry.meta.output_blake3,
        });
    }
    Ok(())
}

/// Which of `entries` the host's store already has complete (one command for all).
fn complete_entries(
    host: &dyn Host,
    store: &HostStore,
    entries: &[&Entry],
) -> Result<std::collections::BTreeSet<String>, PushError> {
    let metas: Vec<String> = entries
        .iter()
        .map(|e| shell_quote(&store.entry_dir(e).join(META_FILE).display().to_string()))
        .collect();
    let out = host.run(&format!(
        "for m in {}; do [ -e \"$m\" ] && basename \"$(dirname \"$m\")\"; done; true",
        metas.join(" ")
    ))?;
    if !out.success() {
        return Err(PushError::Command {
            host: host.name().to_string(),
            what: "Listing the host's store",
            status: out.status,
            output: out.text(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// One file of an entry: where it is here, its name inside the entry, and the blake3 the
/// host must read back.
struct EntryFile {
    local: PathBuf,
    relative: PathBuf,
    len: u64,
    blake3: ContentHash,
}

/// The entry's disk, boot files and meta.json (last). The disk's hash is the one its
/// metadata records (so a locally damaged disk is refused by the host too); the small
/// files are hashed here.
fn entry_files(entry: &Entry) -> Result<Vec<EntryFile>, PushError> {
    let local_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PushError::Local { path, source }
    };
    let mut paths = vec![entry.disk_path()];
    if let Some(boot) = entry.boot_dir() {
        let mut boot_files: Vec<PathBuf> = fs_err::read_dir(&boot)
            .map_err(local_error(&boot))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        boot_files.sort();
        paths.extend(boot_files);
    }
    paths.push(entry.dir.join(META_FILE));
    paths
        .into_iter()
        .map(|local| {
            let len = fs_err::metadata(&local).map_err(local_error(&local))?.len();
            let relative = local
                .strip_prefix(&entry.dir)
                .unwrap_or(&local)
                .to_path_buf();
            let blake3 = if relative == Path::new(DISK_FILE) {
                entry.meta.output_blake3
            } else {
                let bytes = fs_err::read(&local).map_err(local_error(&local))?;
                ContentHash::from_blake3(blake3::hash(&bytes))
            };
            Ok(EntryFile {
                local,
                relative,
                len,
                blake3,
            })
        })
        .collect()
}

enum Sent {
    Committed,
    /// The host unpacked the stream but a file did not read back as sent (or the stream
    /// broke); what its check printed.
    Rejected(String),
}

/// Exit status of the push script when the stream or a checksum is wrong (send again).
const REJECTED: i32 = 75;

/// Streams one entry as a tar archive into a script that unpacks, verifies and commits it.
fn send_entry(
    host: &dyn Host,
    store: &HostStore,
    entry: &Entry,
    files: &[EntryFile],
    bar: &indicatif::ProgressBar,
) -> Result<Sent, PushError> {
    let staging = shell_quote(&store.staging_dir(entry).display().to_string());
    let target = shell_quote(&store.entry_dir(entry).display().to_string());
    let checks: String = files
        .iter()
        .map(|f| format!("{}  {}\n", f.blake3.to_hex(), f.relative.display()))
        .collect();
    let script = format!(
        "set -u\n\
         rm -rf {staging} && mkdir -p {staging} \"$(dirname {target})\" || exit 1\n\
         tar -x -f - -C {staging} || {{ rm -rf {staging}; exit {REJECTED}; }}\n\
         cd {staging} && b3sum --check --quiet <<'FARM_SUMS'\n{checks}FARM_SUMS\n\
         [ $? -eq 0 ] || {{ cd /; rm -rf {staging}; exit {REJECTED}; }}\n\
         cd / && chmod -R a-w {staging}/* && chmod 0555 {staging} && rm -rf {target} && mv {staging} {target}\n"
    );
    // The archive is written by a thread into a pipe the host's stdin reads from.
    let (mut reader, writer) = std::io::pipe().map_err(|source| PushError::Local {
        path: entry.dir.clone(),
        source,
    })?;
    let (out, written) = std::thread::scope(|scope| {
        let archive = scope.spawn(move || write_archive(writer, files));
        let out = host.run_with_input(&script, &mut reader, &mut |chunk| {
            bar.inc(chunk.len() as u64)
        });
        drop(reader);
        (out, archive.join().expect("the archive writer panicked"))
    });
    let out = out?;
    match out.status {
        Some(0) => Ok(Sent::Committed),
        Some(REJECTED) => {
            // A stream that could not be read from the local store is a local problem.
            written?;
            Ok(Sent::Rejected(out.text().trim().to_string()))
        }
        status => Err(PushError::Command {
            host: host.name().to_string(),
            what: "Receiving a store entry",
            status,
            output: out.text(),
        }),
    }
}

/// The archive's size: a 512-byte header per file, data padded to 512, two closing blocks.
fn archive_len(files: &[EntryFile]) -> u64 {
    files
        .iter()
        .map(|f| 512 + f.len.div_ceil(512) * 512)
        .sum::<u64>()
        + 1024
}

/// Writes `files` as a tar archive (read-only modes, no owners or times: the store does
/// not need them).
fn write_archive(writer: std::io::PipeWriter, files: &[EntryFile]) -> Result<(), PushError> {
    let mut archive = tar::Builder::new(std::io::BufWriter::with_capacity(
        crate::run::host::STREAM_CHUNK,
        writer,
    ));
    for file in files {
        let local = fs_err::File::open(&file.local).map_err(|source| PushError::Local {
            path: file.local.clone(),
            source,
        })?;
        let mut header = tar::Header::new_ustar();
        header.set_size(file.len);
        header.set_mode(0o444);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        // A host that stopped reading (it failed) shows in its exit status, not here.
        if archive
            .append_data(&mut header, &file.relative, local)
            .is_err()
        {
            return Ok(());
        }
    }
    let _ = archive
        .into_inner()
        .map(|mut w| std::io::Write::flush(&mut w));
    Ok(())
}
