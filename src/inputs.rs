//! Reads the files a configuration refers to (keys, files, local images) and hashes their
//! content, so derivations depend on what the files say, not where they are.
//!
//! A missing file is an error naming the file and the farm.toml line that refers to it —
//! never a silent skip (one of the seed's pain points).

use std::io::Read;
use std::path::Path;

use crate::model::config::Config;
use crate::model::derivation::{InputHashes, referenced_files};
use crate::model::diagnostic::Diagnostic;
use crate::model::hash::ContentHash;

/// Hashes every file `config` refers to; all missing or unreadable files are reported.
pub fn hash_inputs(config: &Config) -> Result<InputHashes, Vec<Diagnostic>> {
    let mut hashes = InputHashes::new();
    let mut problems = Vec::new();
    for (path, at, _) in referenced_files(config) {
        if hashes.contains_key(&path) {
            continue;
        }
        match hash_file(&path) {
            Ok(hash) => {
                hashes.insert(path, hash);
            }
            Err(e) => problems.push(
                Diagnostic::new(format!("Cannot read `{}`: {e}", path.display()), at).hint(
                    "paths are relative to the file that names them; `~/` is your home directory",
                ),
            ),
        }
    }
    if problems.is_empty() {
        Ok(hashes)
    } else {
        Err(problems)
    }
}

/// blake3 of a file's content, streamed in large blocks (keys are tiny, images are not).
pub fn hash_file(path: &Path) -> std::io::Result<ContentHash> {
    let mut file = std::io::BufReader::with_capacity(1 << 20, fs_err::File::open(path)?);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(ContentHash::from_blake3(hasher.finalize()))
}
