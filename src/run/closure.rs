//! Closure push: before a hypervisor VM starts VMs of its own, the store entries they boot
//! from (each layer and every ancestor) are copied into that host's own store.
//!
//! The host's store has the local store's layout (`<root>/store/<key>-<name>/`), so the
//! relative backing paths written at commit resolve there unchanged. Content addressing
//! makes the push incremental: an entry whose `meta.json` is there is complete (it is renamed
//! into `store/` only after every file verified), so only missing entries move.
//!
//! All missing entries of a push travel as one tar stream into one shell script on the host,
//! which unpacks them into a staging directory, reads every file back with one
//! `b3sum --check` against the hashes farm sends with them (a disk's from its entry's
//! metadata), and renames each entry whose files all match into the store. One round trip
//! per push: on a hypervisor VM under TCG each command costs a noticeable fraction of a
//! second, so per-entry (let alone per-file) commands would dominate small closures. An
//! entry that does not read back as sent is sent again and never renamed into the store.
//!
//! A host with `zstd` gets the stream compressed (level 1, here at native speed): ssh into a
//! hypervisor VM under TCG carries only 10-17 MB/s, and layers shrink about threefold (the
//! bundle's L2 image: 388 MiB to 136 MiB), so fewer bytes cross the wire; unpacking and
//! hashing under TCG then take the longest. The host's `b3sum` check reads the unpacked
//! files, so compression changes nothing about what is verified.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::model::hash::ContentHash;
use crate::model::shell::{quote_path, shell_quote};
use crate::progress::Reporter;
use crate::run::host::{Host, HostError};
use crate::store::{DISK_FILE, Entry, META_FILE};
use crate::sys::tar_entry::append_read_only;

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
        Self::new(root.join(crate::model::config::topology::STORE_DIR_NAME))
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
}

/// How the archive travels: compressed when the host can unpack it (`SiteFacts::zstd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushCompression {
    Off,
    Zstd,
}

impl PushCompression {
    /// zstd's fastest level: at ~500 MB/s here it never waits on the wire, which carries
    /// 10-17 MB/s into a TCG guest; higher levels shrink a layer only a little more.
    const ZSTD_LEVEL: i32 = 1;

    /// Below this many bytes of disks a push goes uncompressed: starting zstd in a TCG guest
    /// and decompressing there cost more than the wire saves (the closure_push bench: 23 MiB
    /// in 4.2 s compressed against 3.2 s plain; 405 MiB in 28.5 s against 32.4 s).
    pub const ZSTD_FROM_BYTES: u64 = 64 << 20;

    /// Zstd when the host has it and the push is large enough to gain from it.
    pub fn for_push(has_zstd: bool, disk_bytes: u64) -> Self {
        if has_zstd && disk_bytes >= Self::ZSTD_FROM_BYTES {
            Self::Zstd
        } else {
            Self::Off
        }
    }

    /// The host's end of the stream, into `tar -x`.
    fn unpack(self) -> &'static str {
        match self {
            Self::Off => "",
            Self::Zstd => "zstd -dcq | ",
        }
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
    compression: PushCompression,
    reporter: &Reporter,
) -> Result<PushReport, PushError> {
    let started = Instant::now();
    let present = complete_entries(host, store, entries)?;
    let missing: Vec<&Entry> = entries
        .iter()
        .filter(|e| !present.contains(e.dir_name()))
        .copied()
        .collect();
    let mut report = push_missing(host, store, &missing, compression, reporter)?;
    report.present = entries.len() - missing.len();
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Copies `entries` (parents before children), which the host is known not to have (`farm
/// up` learnt it while observing the site), verifying every file: one round trip.
pub fn push_missing(
    host: &dyn Host,
    store: &HostStore,
    entries: &[&Entry],
    compression: PushCompression,
    reporter: &Reporter,
) -> Result<PushReport, PushError> {
    let started = Instant::now();
    let mut report = PushReport::default();
    let missing: Vec<(&Entry, Vec<EntryFile>)> = entries
        .iter()
        .map(|e| Ok((*e, entry_files(e)?)))
        .collect::<Result<_, PushError>>()?;
    if missing.is_empty() {
        report.elapsed = started.elapsed();
        return Ok(report);
    }
    let stream_len = |missing: &[(&Entry, Vec<EntryFile>)]| {
        missing.iter().map(|(_, f)| archive_len(f)).sum::<u64>() + 1024
    };
    let label = match missing.as_slice() {
        [(only, _)] => only.dir_name().to_string(),
        many => format!("{} entries", many.len()),
    };
    let bar = reporter.bytes_for(
        "push",
        &format!("{label} to {}", host.name()),
        Some(stream_len(&missing)),
    );
    for attempt in 1..=PUSH_ATTEMPTS {
        let position = bar.position();
        let rejected = send_entries(host, store, &missing, compression, &bar)?;
        if rejected.is_empty() {
            for (entry, files) in &missing {
                report.bytes += files.iter().map(|f| f.len).sum::<u64>();
                report.pushed.push(entry.dir_name().to_string());
            }
            break;
        }
        for (entry, _) in missing
            .iter()
            .filter(|(e, _)| rejected.contains_key(e.dir_name()))
        {
            // The host checks a disk against its entry's metadata: when that fails, the
            // local copy may be the damaged one, and sending it again cannot help.
            if rejected[entry.dir_name()].contains(DISK_FILE) {
                check_local_disk(entry)?;
            }
        }
        if attempt == PUSH_ATTEMPTS {
            let (entry, check) = rejected.into_iter().next().expect("non-empty");
            return Err(PushError::Corrupted {
                host: host.name().to_string(),
                dir: store.root.join("store").join(entry),
                attempts: PUSH_ATTEMPTS,
                report: check,
            });
        }
        report.retries += rejected.len() as u32;
        bar.set_position(position);
    }
    bar.finish_and_clear();
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
        .map(|e| quote_path(&store.entry_dir(e).join(META_FILE)))
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
            output: out.said(),
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

/// Exit status of the push script when some entry did not arrive whole (send it again).
const REJECTED: i32 = 75;

/// Streams `entries` as one tar archive (`<entry>/<file>`) into a script that unpacks and
/// verifies them, and commits them all only if every file read back as sent (parents and
/// children go together: no chain is left half there); returns the entries rejected, with
/// what the check said.
fn send_entries(
    host: &dyn Host,
    store: &HostStore,
    entries: &[(&Entry, Vec<EntryFile>)],
    compression: PushCompression,
    bar: &indicatif::ProgressBar,
) -> Result<BTreeMap<String, String>, PushError> {
    let staging_dir = store
        .root
        .join("tmp")
        .join(format!("push.{}", std::process::id()));
    let staging = quote_path(&staging_dir);
    let target = quote_path(&store.root.join("store"));
    let checks: String = entries
        .iter()
        .flat_map(|(entry, files)| {
            files.iter().map(move |f| {
                format!(
                    "{}  {}/{}\n",
                    f.blake3.to_hex(),
                    entry.dir_name(),
                    f.relative.display()
                )
            })
        })
        .collect();
    let names: Vec<String> = entries
        .iter()
        .map(|(e, _)| shell_quote(e.dir_name()))
        .collect();
    // A fixed handful of processes however many entries (under TCG each costs tens of
    // milliseconds): the per-entry work is only in the rare rejected case. The files are on
    // the host's disk (`sync`) before they are renamed into its store: a hypervisor VM that
    // crashes must not come back with entries whose bytes never left its page cache.
    let entry_dirs: Vec<String> = entries
        .iter()
        .map(|(e, _)| shell_quote(&format!("{}/{}", staging_dir.display(), e.dir_name())))
        .collect();
    let targets: Vec<String> = entries
        .iter()
        .map(|(e, _)| {
            shell_quote(
                &store
                    .root
                    .join("store")
                    .join(e.dir_name())
                    .display()
                    .to_string(),
            )
        })
        .collect();
    // One push at a time into a host's store (where `flock` exists, as on every Debian):
    // then any other `push.*` in its `tmp/` is what a push killed half way left (farm, or
    // the host's own qemu, killed mid-stream), and goes.
    let tmp = quote_path(&store.root.join("tmp"));
    let script = format!(
        "set -u\n\
         mkdir -p {tmp} || exit 1\n\
         if command -v flock >/dev/null 2>&1; then\n\
           exec 9>{tmp}/pushing.lock && flock -w 600 9 || exit 1\n\
           rm -rf {tmp}/push.*\n\
         fi\n\
         rm -rf {staging} && mkdir -p {staging} {target} || exit 1\n\
         {{ {unpack}tar -x -f - -C {staging}; }} 2>{staging}.tar || {{ cat {staging}.tar; rm -rf {staging} {staging}.tar; exit {REJECTED}; }}\n\
         cd {staging} && b3sum --check --quiet > {staging}.report 2>&1 <<'FARM_SUMS'\n{checks}FARM_SUMS\n\
         cd /\n\
         if [ -s {staging}.report ]; then\n\
           for e in {names}; do grep -q \"^$e/\" {staging}.report && {{ echo \"rejected $e\"; grep \"^$e/\" {staging}.report; }}; done\n\
           rm -rf {staging} {staging}.report {staging}.tar; exit {REJECTED}\n\
         fi\n\
         chmod -R a-w {dirs} && chmod 0555 {dirs} && sync && rm -rf {targets} && mv {dirs} {target}/ || exit 1\n\
         rm -rf {staging} {staging}.report {staging}.tar\n",
        unpack = compression.unpack(),
        names = names.join(" "),
        dirs = entry_dirs.join(" "),
        targets = targets.join(" "),
    );
    // The archive is written by a thread into a pipe the host's stdin reads from.
    let (mut reader, writer) = std::io::pipe().map_err(|source| PushError::Local {
        path: entries[0].0.dir.clone(),
        source,
    })?;
    let (out, written) = std::thread::scope(|scope| {
        let archive = scope.spawn(move || write_archive(writer, entries, compression, bar));
        let out = host.run_with_input(&script, &mut reader, &mut |_| {});
        drop(reader);
        (out, archive.join().expect("the archive writer panicked"))
    });
    let out = out?;
    match out.status {
        Some(0) => Ok(BTreeMap::new()),
        Some(REJECTED) => {
            // A stream that could not be read from the local store is a local problem.
            written?;
            let text = out.said();
            let mut rejected: BTreeMap<String, String> = BTreeMap::new();
            let mut current: Option<String> = None;
            // The host says which entries failed: only names farm sent count (a hostile
            // host could name anything), and what it says of them is quoted printable.
            let sent = |name: &str| entries.iter().any(|(e, _)| e.dir_name() == name);
            for line in text.lines() {
                if let Some(entry) = line.strip_prefix("rejected ") {
                    current = sent(entry).then(|| entry.to_string());
                    if let Some(entry) = &current {
                        rejected.insert(entry.clone(), String::new());
                    }
                } else if let Some(check) = current.as_ref().and_then(|e| rejected.get_mut(e)) {
                    check.push_str(line);
                    check.push('\n');
                }
            }
            if rejected.is_empty() {
                // The stream itself broke: every entry goes again.
                for (entry, _) in entries {
                    rejected.insert(entry.dir_name().to_string(), text.trim().to_string());
                }
            }
            Ok(rejected)
        }
        status => Err(PushError::Command {
            host: host.name().to_string(),
            what: "Receiving store entries",
            status,
            output: out.said(),
        }),
    }
}

/// An entry's part of the archive: a 512-byte header per file (and one more for a long
/// path), data padded to 512.
fn archive_len(files: &[EntryFile]) -> u64 {
    files
        .iter()
        .map(|f| 1024 + f.len.div_ceil(512) * 512)
        .sum::<u64>()
}

/// Where the archive goes: the pipe to the host, through zstd when it unpacks that. The
/// progress bar counts the archive's bytes before compression, the measure its length was
/// given in.
struct ArchiveSink<'a> {
    out: SinkKind,
    bar: &'a indicatif::ProgressBar,
}

enum SinkKind {
    Plain(std::io::BufWriter<std::io::PipeWriter>),
    Zstd(zstd::Encoder<'static, std::io::BufWriter<std::io::PipeWriter>>),
}

impl<'a> ArchiveSink<'a> {
    fn new(
        writer: std::io::PipeWriter,
        compression: PushCompression,
        bar: &'a indicatif::ProgressBar,
    ) -> std::io::Result<Self> {
        let buffered = std::io::BufWriter::with_capacity(crate::run::host::STREAM_CHUNK, writer);
        let out = match compression {
            PushCompression::Off => SinkKind::Plain(buffered),
            PushCompression::Zstd => {
                SinkKind::Zstd(zstd::Encoder::new(buffered, PushCompression::ZSTD_LEVEL)?)
            }
        };
        Ok(Self { out, bar })
    }

    /// Ends the stream (zstd's last frame) and flushes it into the pipe.
    fn finish(self) -> std::io::Result<()> {
        let mut buffered = match self.out {
            SinkKind::Plain(buffered) => buffered,
            SinkKind::Zstd(encoder) => encoder.finish()?,
        };
        std::io::Write::flush(&mut buffered)
    }
}

impl std::io::Write for ArchiveSink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = match &mut self.out {
            SinkKind::Plain(w) => w.write(buf)?,
            SinkKind::Zstd(w) => w.write(buf)?,
        };
        self.bar.inc(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.out {
            SinkKind::Plain(w) => w.flush(),
            SinkKind::Zstd(w) => w.flush(),
        }
    }
}

/// Writes `files` as a tar archive (read-only modes, no owners or times: the store does
/// not need them).
fn write_archive(
    writer: std::io::PipeWriter,
    entries: &[(&Entry, Vec<EntryFile>)],
    compression: PushCompression,
    bar: &indicatif::ProgressBar,
) -> Result<(), PushError> {
    // A host that stopped reading (it failed) shows in its exit status, not here.
    let Ok(sink) = ArchiveSink::new(writer, compression, bar) else {
        return Ok(());
    };
    let mut archive = tar::Builder::new(sink);
    for (entry, file) in entries
        .iter()
        .flat_map(|(entry, files)| files.iter().map(move |f| (entry, f)))
    {
        let local = fs_err::File::open(&file.local).map_err(|source| PushError::Local {
            path: file.local.clone(),
            source,
        })?;
        // A host that stopped reading (it failed) shows in its exit status, not here.
        if append_read_only(
            &mut archive,
            Path::new(entry.dir_name()).join(&file.relative),
            file.len,
            local,
        )
        .is_err()
        {
            return Ok(());
        }
    }
    let _ = archive.into_inner().map(ArchiveSink::finish);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::PushCompression;

    #[test]
    fn only_a_large_push_to_a_host_with_zstd_is_compressed() {
        let big = PushCompression::ZSTD_FROM_BYTES;
        assert_eq!(PushCompression::for_push(true, big), PushCompression::Zstd);
        assert_eq!(
            PushCompression::for_push(true, big - 1),
            PushCompression::Off
        );
        assert_eq!(
            PushCompression::for_push(false, big * 8),
            PushCompression::Off
        );
    }
}
