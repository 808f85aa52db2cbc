//! `--format vagrant-libvirt`: the flattened qcow2 as a box for Vagrant's libvirt provider,
//! a plain tar of `metadata.json`, `Vagrantfile` and `box.img` (the "version 1" box that
//! every vagrant-libvirt reads; `vagrant box add` unpacks it with bsdtar, which needs no
//! compression). Every entry has mtime 0 and fixed owners, so the box is reproducible like
//! the disk inside it.

use std::io::{self, Write};
use std::path::Path;

use crate::model::build::export::{VAGRANT_BOX_FILES, vagrant_metadata, vagrantfile};
use crate::sys::tar_entry::append_read_only;

/// Writes the box for the qcow2 `disk` (of `virtual_size` bytes), logging in as `user`, to
/// `out`; `guest` is the guest kind Vagrant is told when it cannot detect one.
pub fn write_box(
    disk: &Path,
    virtual_size: u64,
    user: &str,
    guest: Option<&str>,
    out: &Path,
) -> io::Result<()> {
    let file = fs_err::File::create(out)?;
    let mut tar = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, file));
    let [metadata_name, vagrantfile_name, disk_name] = VAGRANT_BOX_FILES;
    let metadata = vagrant_metadata(virtual_size);
    append_read_only(
        &mut tar,
        metadata_name,
        metadata.len() as u64,
        metadata.as_bytes(),
    )?;
    let settings = vagrantfile(user, guest);
    append_read_only(
        &mut tar,
        vagrantfile_name,
        settings.len() as u64,
        settings.as_bytes(),
    )?;
    let disk_file = fs_err::File::open(disk)?;
    let disk_bytes = disk_file.metadata()?.len();
    append_read_only(&mut tar, disk_name, disk_bytes, disk_file)?;
    let mut writer = tar.into_inner()?;
    writer.flush()?;
    writer.into_inner().map_err(|e| e.into_error())?.sync_all()
}
