//! Running out of space is named (issue 31): which filesystem, how much was needed and how
//! much was free, before any work whose size is known; and nothing half-written is left.
//! Each command runs with its store on a small tmpfs, in a mount namespace of its own.

use crate::support::http_server::{TestServer, random_bytes};
use crate::support::mount_ns::{self, StoreMount};
use crate::support::project::{Project, text};

/// The store's tmpfs: smaller than every input below.
const SMALL: StoreMount = StoreMount::Tmpfs { mib: 16 };

fn assert_named_short(out: &std::process::Output, what: &str, needed: &str) {
    let needed = match needed {
        "" => String::new(),
        n => format!("about {n} needed, "),
    };
    assert_eq!(out.status.code(), Some(1), "{}", text(out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!("Not enough space for {what}")),
        "{said}"
    );
    assert!(
        said.contains("(the tmpfs filesystem mounted at `") && said.contains(&needed),
        "{said}"
    );
    assert!(
        said.contains("hint: `farm gc` removes what nothing needs"),
        "{said}"
    );
}

#[test]
fn a_build_a_download_and_an_import_that_do_not_fit_say_where_and_how_much() {
    if !mount_ns::available(
        "a_build_a_download_and_an_import_that_do_not_fit_say_where_and_how_much",
    ) {
        return;
    }
    let big = random_bytes(24 << 20, 31);

    // A local raw image, converted in the store's staging directory.
    let local = Project::new(
        "[images.local]\npath = \"disk.raw\"\nformat = \"raw\"\n\n[targets.amd64]\narch = \"x86_64\"\n",
    );
    fs_err::write(local.path().join("disk.raw"), &big).unwrap();
    let out = mount_ns::farm(&local, SMALL, &["build"]);
    assert_named_short(&out, "`disk.raw`", "24.00 MiB");

    // A download whose size the server announces.
    let server = TestServer::start();
    let url = server.add_bytes("/big.raw", big.clone());
    let remote = Project::new(&format!(
        "[images.remote]\nurl = \"{url}\"\nsha256 = \"{}\"\nformat = \"raw\"\n\n[targets.amd64]\narch = \"x86_64\"\n",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&big))
    ));
    let out = mount_ns::farm(&remote, SMALL, &["build"]);
    assert_named_short(&out, &format!("the download of `{url}`"), "24.00 MiB");

    // An archive of the local image, imported into a store too small for it.
    local.ok(&["build"]);
    let archive = local.path().join("out.farm");
    local.ok(&["store", "export", "local", "-o", archive.to_str().unwrap()]);
    let target = Project::new("");
    let out = mount_ns::farm(
        &target,
        SMALL,
        &["store", "import", archive.to_str().unwrap()],
    );
    assert_named_short(&out, &format!("importing `{}`", archive.display()), "");
    assert!(target.entries().is_empty());
}
