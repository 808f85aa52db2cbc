//! The one way farm writes a file into a tar (store archives, closures pushed to a
//! hypervisor, OCI archives): read-only, owned by root, mtime 0, so the same contents
//! always give the same archive, whoever wrote it and when. GNU headers, so files of
//! 8 GiB or more and long paths still fit.

use std::io::{self, Read, Write};
use std::path::Path;

/// Appends `size` bytes of `data` as the regular file `path`.
pub fn append_read_only<W: Write>(
    tar: &mut tar::Builder<W>,
    path: impl AsRef<Path>,
    size: u64,
    data: impl Read,
) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o444);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mtime(0);
    tar.append_data(&mut header, path, data)
}
