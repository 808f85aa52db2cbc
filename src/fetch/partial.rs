//! The resumable `.part` file of one download: its bytes, the hash state of those bytes, and
//! the server validators (ETag, Last-Modified) kept in a sidecar `<partial>.json` so the
//! next request can say "only if unchanged" (`If-Range`).

use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use reqwest::header::{ETAG, HeaderMap, LAST_MODIFIED};

use super::hashing::{DualHasher, FileHashes, hash_reader};
use super::{Download, FetchError};
use indicatif::ProgressBar;

/// The `.part` file and the hash state of the bytes in it.
/// The bytes fetched by one round of attempts.
pub(super) struct Fetched {
    pub(super) hashes: FileHashes,
    /// Whether some of the bytes were kept from before a `Range` request.
    pub(super) resumed: bool,
}

pub(super) struct Partial {
    pub(super) path: PathBuf,
    pub(super) file: fs_err::File,
    algo: crate::model::hash::HashAlgo,
    /// Bytes in the file that are also hashed; anything after it is cut off before appending.
    pub(super) written: u64,
    /// `None` only while a pipeline owns it.
    pub(super) hasher: Option<DualHasher>,
    validators: Option<Validators>,
    pub(super) resumed: bool,
}

/// What the sidecar `<partial>.json` stores: enough to ask the server "only if unchanged".
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Validators {
    url: String,
    etag: Option<String>,
    last_modified: Option<String>,
}

pub(super) fn sidecar_path(partial: &Path) -> PathBuf {
    let mut name = partial.as_os_str().to_owned();
    name.push(".json");
    PathBuf::from(name)
}

pub(super) fn remove_if_exists(path: &Path) -> std::io::Result<()> {
    match fs_err::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

impl Partial {
    /// Opens (or creates) the `.part` file and hashes what it already holds, so resumed
    /// bytes are verified like new ones. The file is read this once, never again.
    pub(super) fn open(
        req: &Download<'_>,
        fresh: bool,
        progress: &ProgressBar,
    ) -> Result<Self, FetchError> {
        let sidecar = sidecar_path(req.partial);
        if fresh {
            remove_if_exists(req.partial)?;
            remove_if_exists(&sidecar)?;
        }
        if let Some(parent) = req.partial.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs_err::create_dir_all(parent)?;
        }
        let file = fs_err::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(req.partial)?;
        let existing = file.metadata()?.len();
        let mut hasher = DualHasher::new(Some(req.expected.algo));
        let mut validators = None;
        if existing > 0 {
            progress.set_length(existing);
            progress.set_position(0);
            hasher = hash_reader(&mut std::io::Read::take(&file, existing), hasher, progress)?;
            validators = fs_err::read(&sidecar)
                .ok()
                .and_then(|json| serde_json::from_slice::<Validators>(&json).ok());
        }
        let written = hasher.len();
        Ok(Self {
            path: req.partial.to_path_buf(),
            file,
            algo: req.expected.algo,
            written,
            hasher: Some(hasher),
            validators,
            resumed: false,
        })
    }

    pub(super) fn take_hasher(&mut self) -> DualHasher {
        self.hasher
            .take()
            .expect("hasher is back after every pipeline")
    }

    /// Drops bytes that were written but not hashed (a failed write) and positions the file
    /// for appending.
    pub(super) fn truncate_to_written(&mut self) -> std::io::Result<()> {
        self.file.set_len(self.written)?;
        self.file.seek(SeekFrom::Start(self.written))?;
        Ok(())
    }

    pub(super) fn restart(&mut self) -> std::io::Result<()> {
        self.written = 0;
        self.hasher = Some(DualHasher::new(Some(self.algo)));
        self.resumed = false;
        self.validators = None;
        remove_if_exists(&sidecar_path(&self.path))?;
        self.truncate_to_written()
    }

    /// `If-Range` needs a strong ETag or a date; a weak ETag can't prove byte equality.
    pub(super) fn if_range(&self, url: &str) -> Option<String> {
        let v = self.validators.as_ref().filter(|v| v.url == url)?;
        v.etag
            .clone()
            .filter(|e| !e.starts_with("W/"))
            .or_else(|| v.last_modified.clone())
    }

    pub(super) fn save_validators(
        &mut self,
        url: &str,
        headers: &HeaderMap,
    ) -> std::io::Result<()> {
        let header = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let validators = Validators {
            url: url.to_string(),
            etag: header(ETAG),
            last_modified: header(LAST_MODIFIED),
        };
        let json = serde_json::to_vec_pretty(&validators).map_err(std::io::Error::other)?;
        fs_err::write(sidecar_path(&self.path), json)?;
        self.validators = Some(validators);
        Ok(())
    }

    pub(super) fn finish(mut self) -> Fetched {
        Fetched {
            hashes: self.take_hasher().finish(),
            resumed: self.resumed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_sits_beside_the_partial() {
        assert_eq!(
            sidecar_path(Path::new("/s/tmp/x.part")),
            PathBuf::from("/s/tmp/x.part.json")
        );
    }
}
