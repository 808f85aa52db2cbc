//! `farm build` end to end: the real binary, a real HTTP server on 127.0.0.1, real qemu-img.

use crate::support::http_server;
use crate::support::project;

use std::path::PathBuf;
use std::process::Command;

use http_server::{Fault, TestServer};
use project::{Project, list, text};
use sha2::Digest;

/// A small real qcow2 image, as bytes.
fn qcow2_bytes(size: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg(size)
        .status()
        .expect("qemu-img must be installed (apt-get install qemu-utils)");
    assert!(status.success());
    fs_err::read(&path).unwrap()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

fn farm_toml(url: &str, sha256: &str, extra: &str) -> String {
    format!(
        "[images.deb]\nurl = \"{url}\"\nsha256 = \"{sha256}\"\n\n[targets.amd64]\narch = \"x86_64\"\n{extra}"
    )
}

#[test]
fn build_fetches_verifies_and_a_second_build_is_a_cache_hit() {
    let server = TestServer::start();
    let image = qcow2_bytes("64M");
    let url = server.add_bytes("/deb.qcow2", image.clone());
    let project = Project::new(&farm_toml(&url, &sha256_hex(&image), ""));

    let first = project.run(&["build"]);
    assert!(first.status.success(), "{}", text(&first));
    let entries = project.entries();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(entries[0].ends_with("-deb"), "{entries:?}");
    let disk = project
        .path()
        .join("cache/store")
        .join(&entries[0])
        .join("disk.qcow2");
    assert_eq!(fs_err::read(&disk).unwrap(), image);
    assert!(fs_err::metadata(&disk).unwrap().permissions().readonly());
    let meta: serde_json::Value = serde_json::from_slice(
        &fs_err::read(
            project
                .path()
                .join("cache/store")
                .join(&entries[0])
                .join("meta.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        meta["output_blake3"],
        format!("blake3-{}", blake3::hash(&image).to_hex())
    );

    let requests = server.request_count();
    let second = project.run(&["build"]);
    assert!(second.status.success(), "{}", text(&second));
    assert_eq!(
        server.request_count(),
        requests,
        "a cache hit makes no request"
    );
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("cached"),
        "{}",
        text(&second)
    );

    let plan = project.run(&["plan"]);
    assert!(
        String::from_utf8_lossy(&plan.stdout).starts_with("cached"),
        "{}",
        text(&plan)
    );
}

#[test]
fn a_hash_mismatch_fails_naming_both_hashes_and_stores_nothing() {
    let server = TestServer::start();
    let image = qcow2_bytes("16M");
    let url = server.add_bytes("/deb.qcow2", image.clone());
    let wrong = "ab".repeat(32);
    let project = Project::new(&farm_toml(&url, &wrong, ""));

    let out = project.run(&["build"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&wrong), "{}", text(&out));
    assert!(stderr.contains(&sha256_hex(&image)), "{}", text(&out));
    assert!(project.entries().is_empty());
    assert!(list(&project.path().join("cache/tmp")).is_empty());
    assert!(
        list(&project.path().join("cache/partial")).is_empty(),
        "no bad bytes linger"
    );
}

#[test]
fn a_dropped_download_resumes_on_the_next_build() {
    let server = TestServer::start();
    let image = qcow2_bytes("8M");
    let mut padded = image.clone();
    padded.resize(4 << 20, 0); // make the body large enough to drop halfway through
    let url = server.add_bytes("/deb.qcow2", padded.clone());
    server.set_fault(Some(Fault {
        close_after_bytes: 2 << 20,
        first_requests: 1,
    }));
    let project = Project::new(&farm_toml(&url, &sha256_hex(&padded), ""));

    let first = project
        .farm(&["build"])
        .env("FARM_FETCH_ATTEMPTS", "1")
        .output()
        .unwrap();
    assert_eq!(first.status.code(), Some(1), "{}", text(&first));
    assert!(
        String::from_utf8_lossy(&first.stderr).contains(&url),
        "{}",
        text(&first)
    );
    assert!(project.entries().is_empty());

    let second = project
        .farm(&["build"])
        .env("FARM_FETCH_ATTEMPTS", "1")
        .output()
        .unwrap();
    assert!(second.status.success(), "{}", text(&second));
    let ranges = server.range_headers();
    let resumed_at: Vec<u64> = ranges
        .iter()
        .flatten()
        .filter_map(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
        .collect();
    assert!(
        resumed_at.iter().any(|n| *n > 0),
        "the second build resumes with a Range request: {ranges:?}"
    );
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(
        said.contains(&format!("note: resuming `{url}` at 2.00 MiB of 4.00 MiB")),
        "off a terminal, the resume is a line: {said}"
    );
    let verify = project.run(&["store", "verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
}

#[test]
fn off_a_terminal_each_retry_and_resume_is_a_line() {
    let server = TestServer::start();
    let mut image = qcow2_bytes("8M");
    image.resize(4 << 20, 0);
    let url = server.add_bytes("/deb.qcow2", image.clone());
    server.set_fault(Some(Fault {
        close_after_bytes: 1 << 20,
        first_requests: 2,
    }));
    let project = Project::new(&farm_toml(&url, &sha256_hex(&image), ""));
    let out = project
        .farm(&["build", "--fetch-attempts", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    for line in [
        "warning: attempt 1 of 3 failed: Download of",
        "warning: attempt 2 of 3 failed: Download of",
        "note: resuming",
    ] {
        assert!(said.contains(line), "expected `{line}` in:\n{said}");
    }
    assert_eq!(said.matches("note: resuming").count(), 2, "{said}");
}

/// A server that accepts connections and never answers: the stall `--fetch-timeout` bounds.
fn silent_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    format!("http://{addr}/deb.qcow2")
}

#[test]
fn a_server_that_never_answers_stalls_after_the_fetch_timeout_naming_url_and_seconds() {
    let url = silent_server();
    let project = Project::new(&farm_toml(&url, &"00".repeat(32), ""));
    let out = project
        .farm(&["build", "--fetch-timeout", "1", "--fetch-attempts", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("warning: attempt 1 of 2 failed:") && said.contains("retrying in"),
        "{said}"
    );
    assert!(
        said.contains(&format!("`{url}` sent nothing for 1 s")),
        "the stall names the URL and the timeout: {said}"
    );
    assert!(said.contains("--fetch-timeout SECONDS"), "{said}");
    assert!(project.entries().is_empty());

    let zero = project.run(&["build", "--fetch-timeout", "0"]);
    assert_eq!(zero.status.code(), Some(2), "{}", text(&zero));
}

#[test]
fn a_truncated_xz_that_matches_its_hash_is_called_broken_as_published() {
    let server = TestServer::start();
    let mut xz = Vec::new();
    {
        use std::io::Write;
        let mut enc = xz2::write::XzEncoder::new(&mut xz, 1);
        enc.write_all(&http_server::random_bytes(1 << 20, 7))
            .unwrap();
        enc.finish().unwrap();
    }
    xz.truncate(xz.len() / 2);
    let url = server.add_bytes("/deb.raw.xz", xz.clone());
    let project = Project::new(&farm_toml(&url, &sha256_hex(&xz), ""));
    let out = project.run(&["build"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!(
            "Image `deb`: `{url}` matches its declared sha256, but the file itself is broken"
        )),
        "{said}"
    );
    assert!(
        said.contains("fix the declaration, with another mirror"),
        "{said}"
    );
    assert!(
        !said.contains("fetch it again"),
        "fetching again cannot help: {said}"
    );
    assert!(project.entries().is_empty());

    // The same file on disk, declared by `path`: copying it again cannot help either.
    let local = Project::new(&format!(
        "[images.deb]\npath = \"deb.raw.xz\"\nsha256 = \"{}\"\n",
        sha256_hex(&xz)
    ));
    fs_err::write(local.path().join("deb.raw.xz"), &xz).unwrap();
    let out = local.run(&["build"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("Image `deb`: `")
            && said
                .contains("deb.raw.xz` matches its declared sha256, but the file itself is broken"),
        "{said}"
    );
    assert!(
        said.contains("fix the declaration, with a good copy"),
        "{said}"
    );
    assert!(!said.contains("fetch it again"), "{said}");
    assert!(local.entries().is_empty());
}

#[test]
fn a_damaged_entry_is_never_cached_and_verify_checks_past_stray_files() {
    let server = TestServer::start();
    let image = qcow2_bytes("16M");
    let url = server.add_bytes("/deb.qcow2", image.clone());
    let extra = "[platforms.p]\nfrom = \"deb\"\n";
    let project = Project::new(&farm_toml(&url, &sha256_hex(&image), extra));
    project.ok(&["build"]);
    assert_eq!(project.entries().len(), 2, "{:?}", project.entries());

    // A stray file among the entries is reported, and every entry is still verified.
    project.write("cache/store/notes.txt", "mine\n");
    let verify = project.run(&["store", "verify"]);
    assert_eq!(verify.status.code(), Some(1), "{}", text(&verify));
    let said = text(&verify);
    assert_eq!(said.matches("          ok ").count(), 2, "{said}");
    assert!(said.contains("notes.txt"), "{said}");
    fs_err::remove_file(project.path().join("cache/store/notes.txt")).unwrap();

    // The image's disk is changed behind farm's back (root ignores the read-only mode).
    let image_entry = project.entry("deb");
    let disk = image_entry.join("disk.qcow2");
    let mut bytes = fs_err::read(&disk).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs_err::write(&disk, &bytes).unwrap();

    let build = project.run(&["build"]);
    assert_eq!(build.status.code(), Some(1), "{}", text(&build));
    let said = String::from_utf8_lossy(&build.stderr);
    assert!(said.contains("has changed since it was built"), "{said}");
    assert!(
        said.contains("hint: `farm store verify` lists every damaged entry"),
        "{said}"
    );
    assert!(
        !said.contains("cached"),
        "a damaged entry is not `cached`: {said}"
    );

    // `up` refuses it before any VM boots on it.
    project.write(
        "farm.toml",
        &farm_toml(
            &url,
            &sha256_hex(&image),
            &format!("{extra}[vms.a]\nplatform = \"p\"\n"),
        ),
    );
    let up = project.run(&["up", "--boot-timeout", "20"]);
    assert_eq!(up.status.code(), Some(1), "{}", text(&up));
    assert!(
        String::from_utf8_lossy(&up.stderr)
            .contains("`farm store verify` lists every damaged entry"),
        "{}",
        text(&up)
    );
    assert!(
        !project.path().join(".farm/vms/a").exists(),
        "no instance of `a` is made: {:?}",
        list(&project.path().join(".farm/vms"))
    );

    let verify = project.run(&["store", "verify"]);
    assert_eq!(verify.status.code(), Some(1), "{}", text(&verify));
    assert!(
        text(&verify).contains(&format!(
            "{}",
            image_entry.file_name().unwrap().to_string_lossy()
        )),
        "{}",
        text(&verify)
    );
}

#[test]
fn two_concurrent_builds_make_one_entry_and_both_succeed() {
    let server = TestServer::start();
    let image = qcow2_bytes("64M");
    let mut padded = image.clone();
    padded.resize(96 << 20, 0); // long enough that the two processes overlap
    let url = server.add_bytes("/deb.qcow2", padded.clone());
    let project = Project::new(&farm_toml(&url, &sha256_hex(&padded), ""));

    let spawn = || {
        project
            .farm(&["build"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", text(&a));
    assert!(b.status.success(), "{}", text(&b));
    assert_eq!(project.entries().len(), 1, "{:?}", project.entries());
    assert!(list(&project.path().join("cache/tmp")).is_empty());
    let verify = project.run(&["store", "verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
}

#[test]
fn a_platform_without_steps_is_an_empty_layer_with_a_relative_backing_file_and_the_store_can_move()
{
    let server = TestServer::start();
    let image = qcow2_bytes("64M");
    let url = server.add_bytes("/deb.qcow2", image.clone());
    let extra = "[platforms.base]\nfrom = \"deb\"\n[platforms.web]\nfrom = \"base\"\n";
    let project = Project::new(&farm_toml(&url, &sha256_hex(&image), extra));
    let out = project.run(&["build"]);
    assert!(out.status.success(), "{}", text(&out));
    let entries = project.entries();
    assert_eq!(entries.len(), 3, "{entries:?}");
    let web = entries.iter().find(|e| e.ends_with("-web_amd64")).unwrap();
    let base = entries.iter().find(|e| e.ends_with("-base_amd64")).unwrap();

    let moved = tempfile::tempdir().unwrap();
    let new_store = moved.path().join("elsewhere");
    fs_err::rename(project.path().join("cache"), &new_store).unwrap();
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", "--backing-chain"])
        .arg(new_store.join("store").join(web).join("disk.qcow2"))
        .output()
        .unwrap();
    assert!(info.status.success(), "{}", text(&info));
    let chain: Vec<serde_json::Value> = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(chain.len(), 3, "web → base → deb");
    assert_eq!(
        chain[0]["backing-filename"],
        format!("../{base}/disk.qcow2")
    );

    // The moved store still answers: everything is cached there.
    let again = project
        .farm(&["build"])
        .env("FARM_STORE", &new_store)
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(server.request_count(), 1);
}

#[test]
fn a_compressed_raw_image_is_unpacked_and_converted_to_qcow2() {
    let server = TestServer::start();
    let raw = vec![0x5au8; 3 << 20];
    let mut xz = Vec::new();
    {
        use std::io::Write;
        let mut enc = xz2::write::XzEncoder::new(&mut xz, 1);
        enc.write_all(&raw).unwrap();
        enc.finish().unwrap();
    }
    let url = server.add_bytes("/deb.raw.xz", xz.clone());
    let project = Project::new(&farm_toml(&url, &sha256_hex(&xz), ""));
    let out = project.run(&["build"]);
    assert!(out.status.success(), "{}", text(&out));
    let entry = &project.entries()[0];
    let disk: PathBuf = project
        .path()
        .join("cache/store")
        .join(entry)
        .join("disk.qcow2");
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&disk)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 3 << 20);
}

#[test]
fn a_local_image_with_a_wrong_hash_is_rejected_and_left_alone() {
    let image = qcow2_bytes("16M");
    let project = Project::new(&format!(
        "[images.local]\npath = \"disk.qcow2\"\nsha256 = \"{}\"\n",
        "00".repeat(32)
    ));
    fs_err::write(project.path().join("disk.qcow2"), &image).unwrap();
    let out = project.run(&["build"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&sha256_hex(&image)),
        "{}",
        text(&out)
    );
    assert_eq!(
        fs_err::read(project.path().join("disk.qcow2")).unwrap(),
        image
    );
    assert!(project.entries().is_empty());
}

#[test]
fn an_invalid_farm_toml_exits_2_and_touches_nothing() {
    let project = Project::new("[platforms.p]\nfrom = \"nothing\"\n");
    let out = project.run(&["build"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--> farm.toml:2:8"), "{}", text(&out));
    assert!(
        !project.path().join("cache").exists(),
        "nothing is created for bad input"
    );
}

#[test]
fn a_missing_key_file_is_an_error_naming_the_file_and_line() {
    let project = Project::new(
        "[images.deb]\npath = \"d.qcow2\"\n[platforms.p]\nfrom = \"deb\"\nauthorized_keys = [\"keys/none.pub\"]\n",
    );
    fs_err::write(project.path().join("d.qcow2"), qcow2_bytes("1M")).unwrap();
    let out = project.run(&["build"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("keys/none.pub"), "{}", text(&out));
    assert!(stderr.contains("--> "), "{}", text(&out));
    assert!(stderr.contains("farm.toml:5:"), "{}", text(&out));
}

#[test]
fn a_missing_test_script_is_an_error_naming_it_and_its_line() {
    let project = Project::new(
        "[targets.amd64]\narch = \"x86_64\"\n[tests.smoke]\nscript = \"tests/smoke.sh\"\n",
    );
    for command in [&["check"][..], &["test"]] {
        let out = project.run(command);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("tests/smoke.sh` of test `smoke` does not exist")
                && stderr.contains("farm.toml:4:"),
            "{}",
            text(&out)
        );
    }
    let out = Project::new("[targets.amd64]\narch = \"x86_64\"\n").run(&["test"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("declares no tests"),
        "{}",
        text(&out)
    );
}

#[test]
fn unknown_names_on_the_command_line_exit_2_with_a_hint() {
    let project = Project::new("[targets.amd64]\narch = \"x86_64\"\n");
    let out = project.run(&["show", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("hint:"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_renamed_image_or_platform_is_the_same_derivation_and_a_cache_hit() {
    let server = TestServer::start();
    let image = qcow2_bytes("16M");
    let url = server.add_bytes("/deb.qcow2", image.clone());
    let extra = "[platforms.web]\nfrom = \"deb\"\n";
    let project = Project::new(&farm_toml(&url, &sha256_hex(&image), extra));
    project.ok(&["build"]);
    let before = project.entries();
    let requests = server.request_count();

    // Same recipes under new names: `deb` → `bookworm`, `web` → `frontend`.
    let renamed = farm_toml(
        &url,
        &sha256_hex(&image),
        "[platforms.frontend]\nfrom = \"bookworm\"\n",
    )
    .replace("[images.deb]", "[images.bookworm]");
    project.write("farm.toml", &renamed);
    let again = project.ok(&["build"]);
    assert_eq!(
        project.entries(),
        before,
        "no second entry: {}",
        text(&again)
    );
    assert_eq!(server.request_count(), requests, "nothing is fetched again");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("all 2 derivations are cached"),
        "{}",
        text(&again)
    );
    // The entry keeps its first label; `show` finds it under the new name.
    let shown = project.entry("frontend_amd64");
    assert!(
        shown
            .file_name()
            .unwrap()
            .to_string_lossy()
            .ends_with("-web_amd64"),
        "{shown:?}"
    );
}

#[test]
fn build_writes_farm_lock_and_locked_fails_naming_the_platform_and_the_changed_step() {
    let server = TestServer::start();
    let image = qcow2_bytes("16M");
    let url = server.add_bytes("/deb.qcow2", image.clone());
    let sha = sha256_hex(&image);
    let extra = "[platforms.p]\nfrom = \"deb\"\n";
    let project = Project::new(&farm_toml(&url, &sha, extra));

    // Without a lock, `--locked` has nothing to hold the build to.
    let out = project.run(&["build", "--locked"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(
            "farm.lock` does not exist, and `--locked` builds only what a lock describes"
        ),
        "{}",
        text(&out)
    );
    assert!(project.entries().is_empty(), "nothing built");

    let out = project.ok(&["build"]);
    assert!(text(&out).contains("locked `"), "{}", text(&out));
    let lock_path = project.path().join("farm.lock");
    let lock = fs_err::read_to_string(&lock_path).unwrap();
    assert!(lock.starts_with("# farm.lock"), "{lock}");
    for name in ["[derivations.deb]", "[derivations.p_amd64]"] {
        assert!(lock.contains(name), "{name} in {lock}");
    }
    let p_entry = project.entry("p");
    let meta: serde_json::Value =
        serde_json::from_slice(&fs_err::read(p_entry.join("meta.json")).unwrap()).unwrap();
    assert!(
        lock.contains(&format!(
            "output = \"{}\"",
            meta["output_blake3"].as_str().unwrap()
        )),
        "the lock records the output: {lock}"
    );
    let written = fs_err::metadata(&lock_path).unwrap().modified().unwrap();

    // An unchanged project builds under --locked, and a plain rebuild leaves the lock alone.
    project.ok(&["build", "--locked"]);
    let out = project.ok(&["build"]);
    assert!(!text(&out).contains("locked `"), "{}", text(&out));
    assert_eq!(
        fs_err::metadata(&lock_path).unwrap().modified().unwrap(),
        written
    );

    // A changed step: refused before anything is planned or built, naming what changed.
    project.write(
        "farm.toml",
        &farm_toml(
            &url,
            &sha,
            "[platforms.p]\nfrom = \"deb\"\npackages = [\"htop\"]\n",
        ),
    );
    let entries = project.entries();
    for args in [
        &["build", "--locked"][..],
        &["build", "--locked", "--dry-run"],
    ] {
        let out = project.run(args);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let said = text(&out);
        assert!(
            said.contains(
                "platform `p` for target `amd64` (`p_amd64`) differs from farm.lock: \
                 `steps.packages` changed"
            ),
            "{said}"
        );
        assert!(said.contains("hint: if the change is meant"), "{said}");
        assert!(
            !said.contains("deb`) differs"),
            "the image is unchanged: {said}"
        );
    }
    assert_eq!(project.entries(), entries, "nothing was built");
    assert_eq!(fs_err::read_to_string(&lock_path).unwrap(), lock);
}

#[test]
fn check_rebuilds_into_scratch_and_reports_whether_outputs_match() {
    let server = TestServer::start();
    let image = qcow2_bytes("16M");
    let url = server.add_bytes("/deb.qcow2", image.clone());
    let extra = "[platforms.p]\nfrom = \"deb\"\n";
    let project = Project::new(&farm_toml(&url, &sha256_hex(&image), extra));

    let out = project.run(&["build", "--check", "p"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("is not in the store, so there is nothing to compare"),
        "{}",
        text(&out)
    );

    project.ok(&["build"]);
    let entries = project.entries();
    let out = project.ok(&["build", "--check", "--strict"]);
    let said = text(&out);
    assert!(
        said.contains("reproduced p_amd64: the same output, bit for bit"),
        "{said}"
    );
    assert!(said.contains("fixed deb: its hash is its key"), "{said}");
    assert!(
        said.contains("checked 1 reproduced, 0 differ, 1 fixed-output"),
        "{said}"
    );
    assert_eq!(project.entries(), entries, "the store is unchanged");
    assert_eq!(
        fs_err::read_dir(project.store.join("tmp")).unwrap().count(),
        0,
        "scratch directories are removed"
    );
}

/// `--dry-run` says how each platform's steps will run: in a build VM, or in a chroot from
/// farm's appliance; nothing is fetched or built.
#[test]
fn a_dry_run_says_which_platforms_build_in_a_chroot() {
    let server = TestServer::start();
    let image = qcow2_bytes("16M");
    let url = server.add_bytes("/deb.qcow2", image.clone());
    let project = Project::new(&farm_toml(
        &url,
        &sha256_hex(&image),
        "[platforms.jailed]\nfrom = \"deb\"\nbuilder = \"chroot\"\nrun = [\"true\"]\n\
         [platforms.booted]\nfrom = \"deb\"\nrun = [\"true\"]\n",
    ));
    let out = project.run(&["build", "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    let line = |name: &str| {
        said.lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("no line for {name} in:\n{said}"))
            .to_string()
    };
    assert!(
        line("jailed_amd64").ends_with("1 step kind in a chroot from farm's appliance"),
        "{said}"
    );
    assert!(
        line("booted_amd64").ends_with("1 step kind in a build VM"),
        "{said}"
    );
    assert!(project.entries().is_empty(), "{:?}", project.entries());
}
