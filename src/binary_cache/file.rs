//! A binary cache in a directory (`file://`): objects are files, written to a temporary
//! file beside their place and renamed into it, so readers never see half of one.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::backend::{Backend, BackendError, Counting, Progress};

pub(super) struct FileBackend {
    url: String,
    root: PathBuf,
}

impl FileBackend {
    pub(super) fn open(url: &str, parsed: &url::Url) -> Result<FileBackend, BackendError> {
        let root = parsed
            .to_file_path()
            .map_err(|()| BackendError::Unreachable {
                url: url.to_string(),
                reason: "it names no local directory".into(),
            })?;
        Ok(FileBackend {
            url: url.to_string(),
            root,
        })
    }

    fn io(&self, path: &str) -> impl Fn(io::Error) -> BackendError + '_ {
        let path = path.to_string();
        move |source| BackendError::Io {
            url: self.url.clone(),
            path: path.clone(),
            source,
        }
    }
}

impl Backend for FileBackend {
    fn url(&self) -> &str {
        &self.url
    }

    fn get(&self, path: &str, _bytes: u64) -> Result<Option<Box<dyn Read + Send>>, BackendError> {
        match fs_err::File::open(self.root.join(path)) {
            Ok(file) => Ok(Some(Box::new(io::BufReader::with_capacity(1 << 20, file)))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if self.root.is_dir() {
                    Ok(None)
                } else {
                    Err(BackendError::Unreachable {
                        url: self.url.clone(),
                        reason: format!("`{}` is not a directory", self.root.display()),
                    })
                }
            }
            Err(e) => Err(self.io(path)(e)),
        }
    }

    fn size(&self, path: &str) -> Result<Option<u64>, BackendError> {
        match fs_err::metadata(self.root.join(path)) {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(path)(e)),
        }
    }

    fn put(&self, path: &str, file: &Path, sent: &Progress) -> Result<(), BackendError> {
        let target = self.root.join(path);
        let dir = target.parent().expect("cache paths have a directory");
        fs_err::create_dir_all(dir).map_err(self.io(path))?;
        // Readable by all, as a file the user copied there would be: a directory cache is
        // often served as is by a web server running as another user. (A temporary file
        // is otherwise private.) Nothing in a cache is secret; records are signed.
        let tmp = tempfile::Builder::new()
            .prefix(".upload.")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .tempfile_in(dir)
            .map_err(self.io(path))?;
        let mut source = Counting {
            inner: fs_err::File::open(file).map_err(self.io(path))?,
            progress: sent.clone(),
        };
        io::copy(&mut source, &mut tmp.as_file()).map_err(self.io(path))?;
        tmp.persist(&target).map_err(|e| self.io(path)(e.error))?;
        Ok(())
    }
}
