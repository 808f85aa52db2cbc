//! Downloads against a real HTTP server on 127.0.0.1: hashing, resume, retries, failures,
//! and decompression of every supported format.

use crate::support::http_server;

use std::io::Write;
use std::path::{Path, PathBuf};

use farm::fetch::{Compression, Download, Downloaded, FetchError, decompress, download};
use farm::model::hash::{ContentHash, ExpectedHash, HashAlgo, StreamHasher};
use http_server::{Fault, Route, TestServer, random_bytes};
use indicatif::ProgressBar;

const LEN: usize = 3 * 1024 * 1024 + 123;

fn digest(algo: HashAlgo, bytes: &[u8]) -> ExpectedHash {
    let mut h = StreamHasher::new(algo);
    h.update(bytes);
    h.finish()
}

struct Fixture {
    server: TestServer,
    _dir: tempfile::TempDir,
    partial: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("tmp").join("image.part");
        Self {
            server: TestServer::start(),
            _dir: dir,
            partial,
        }
    }

    fn get(
        &self,
        url: &str,
        expected: &ExpectedHash,
        attempts: u32,
    ) -> Result<Downloaded, FetchError> {
        self.get_telling(url, expected, attempts, farm::fetch::DEFAULT_STALL_TIMEOUT)
            .0
    }

    /// Like `get`, with the stall timeout given; also returns the lines the download said.
    fn get_telling(
        &self,
        url: &str,
        expected: &ExpectedHash,
        attempts: u32,
        stall_timeout: std::time::Duration,
    ) -> (Result<Downloaded, FetchError>, Vec<String>) {
        let lines = std::sync::Mutex::new(Vec::new());
        let say = |line: &str| lines.lock().unwrap().push(line.to_string());
        let req = Download {
            url,
            expected,
            partial: &self.partial,
            attempts,
            stall_timeout,
            say: &say,
        };
        let result = download(&req, &ProgressBar::hidden());
        (result, lines.into_inner().unwrap())
    }

    fn partial_len(&self) -> Option<u64> {
        fs_err::metadata(&self.partial).ok().map(|m| m.len())
    }

    fn sidecar(&self) -> PathBuf {
        PathBuf::from(format!("{}.json", self.partial.display()))
    }
}

fn assert_complete(got: &Downloaded, fx: &Fixture, data: &[u8]) {
    assert_eq!(got.path, fx.partial);
    assert_eq!(got.size, data.len() as u64);
    assert_eq!(got.blake3, ContentHash::of(data));
    assert_eq!(got.compression, Compression::None);
    assert!(
        fs_err::read(&got.path).unwrap() == data,
        "file content differs"
    );
    assert!(
        !fx.sidecar().exists(),
        "sidecar is removed once the download is complete"
    );
}

#[test]
fn good_hash_downloads_and_verifies_with_every_algorithm() {
    let data = random_bytes(LEN, 1);
    for algo in [HashAlgo::Sha256, HashAlgo::Sha512, HashAlgo::Blake3] {
        let fx = Fixture::new();
        let url = fx.server.add_bytes("/disk.qcow2", data.clone());
        let got = fx.get(&url, &digest(algo, &data), 1).unwrap();
        assert_complete(&got, &fx, &data);
        assert_eq!(fx.server.range_headers(), vec![None], "{algo:?}");
    }
}

#[test]
fn bad_hash_is_an_error_with_both_hashes_and_the_part_file_is_deleted() {
    let fx = Fixture::new();
    let data = random_bytes(LEN, 2);
    let url = fx.server.add_bytes("/disk.qcow2", data.clone());
    let wrong = digest(HashAlgo::Sha256, b"something else");
    let err = fx.get(&url, &wrong, 3).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FetchError::HashMismatch { .. }), "{err:?}");
    assert!(msg.contains(&wrong.to_hex()), "{msg}");
    assert!(
        msg.contains(&digest(HashAlgo::Sha256, &data).to_hex()),
        "{msg}"
    );
    assert!(msg.contains(&format!("`{url}`")), "{msg}");
    assert!(msg.contains("hint:"), "{msg}");
    assert!(
        !fx.partial.exists(),
        "a mismatching download must not linger"
    );
    assert!(!fx.sidecar().exists());
    // Fresh download, not resumed: no second try from scratch.
    assert_eq!(fx.server.request_count(), 1);
}

#[test]
fn dropped_connection_keeps_the_part_file_and_the_next_call_resumes() {
    let fx = Fixture::new();
    let data = random_bytes(LEN, 3);
    let url = fx.server.add_bytes("/disk.qcow2", data.clone());
    let expected = digest(HashAlgo::Sha256, &data);
    fx.server.set_fault(Some(Fault {
        close_after_bytes: 1_000_000,
        first_requests: 1,
    }));

    let err = fx.get(&url, &expected, 1).unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(err.to_string().contains(&url), "{err}");
    let kept = fx.partial_len().expect(".part file kept for resuming");
    assert!(kept > 0 && kept < LEN as u64, "kept {kept} bytes");
    assert!(fx.sidecar().exists(), "validators are kept for If-Range");

    let got = fx.get(&url, &expected, 1).unwrap();
    assert_complete(&got, &fx, &data);
    let requests = fx.server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].range, Some(format!("bytes={kept}-")));
    assert!(
        requests[1].if_range.is_some(),
        "resume sends the stored ETag"
    );
    assert_eq!(requests[1].status, 206);
}

#[test]
fn dropped_connection_with_three_attempts_succeeds_in_one_call() {
    let fx = Fixture::new();
    let data = random_bytes(LEN, 4);
    let url = fx.server.add_bytes("/disk.qcow2", data.clone());
    fx.server.set_fault(Some(Fault {
        close_after_bytes: 700_000,
        first_requests: 2,
    }));
    let got = fx.get(&url, &digest(HashAlgo::Sha512, &data), 3).unwrap();
    assert_complete(&got, &fx, &data);
    let ranges = fx.server.range_headers();
    assert_eq!(ranges.len(), 3, "{ranges:?}");
    assert_eq!(ranges[0], None);
    let offset = |r: &Option<String>| -> u64 {
        r.as_deref()
            .unwrap()
            .strip_prefix("bytes=")
            .unwrap()
            .trim_end_matches('-')
            .parse()
            .unwrap()
    };
    assert!(offset(&ranges[1]) > 0);
    assert!(offset(&ranges[2]) > offset(&ranges[1]), "{ranges:?}");
}

#[test]
fn server_ignoring_range_still_gives_a_correct_file() {
    let fx = Fixture::new();
    let data = random_bytes(LEN, 5);
    let url = fx.server.add_bytes("/disk.qcow2", data.clone());
    let expected = digest(HashAlgo::Blake3, &data);
    fx.server.set_fault(Some(Fault {
        close_after_bytes: 1_500_000,
        first_requests: 1,
    }));
    fx.get(&url, &expected, 1).unwrap_err();
    assert!(fx.partial_len().unwrap() > 0);

    fx.server.set_ignore_range(true);
    let got = fx.get(&url, &expected, 1).unwrap();
    assert_complete(&got, &fx, &data);
    let requests = fx.server.requests();
    assert!(requests[1].range.is_some());
    assert_eq!(requests[1].status, 200);
}

#[test]
fn changed_upstream_file_is_detected_by_if_range_and_downloaded_whole() {
    let fx = Fixture::new();
    let old = random_bytes(LEN, 6);
    let url = fx.server.add_bytes("/disk.qcow2", old.clone());
    fx.server.set_fault(Some(Fault {
        close_after_bytes: 1_000_000,
        first_requests: 1,
    }));
    fx.get(&url, &digest(HashAlgo::Sha256, &old), 1)
        .unwrap_err();

    let new = random_bytes(LEN, 7);
    fx.server.add_bytes("/disk.qcow2", new.clone());
    let got = fx.get(&url, &digest(HashAlgo::Sha256, &new), 1).unwrap();
    assert_complete(&got, &fx, &new);
    let requests = fx.server.requests();
    assert_eq!(requests.len(), 2);
    assert!(requests[1].if_range.is_some());
    assert_eq!(
        requests[1].status, 200,
        "stale ETag: the server sends the new file whole"
    );
}

#[test]
fn stale_partial_without_validators_is_retried_from_scratch() {
    let fx = Fixture::new();
    let data = random_bytes(LEN, 8);
    let url = fx.server.add_bytes("/disk.qcow2", data.clone());
    // A `.part` left by some other file, with no sidecar to prove where it came from.
    fs_err::create_dir_all(fx.partial.parent().unwrap()).unwrap();
    fs_err::write(&fx.partial, random_bytes(500_000, 99)).unwrap();

    let got = fx.get(&url, &digest(HashAlgo::Sha256, &data), 1).unwrap();
    assert_complete(&got, &fx, &data);
    let requests = fx.server.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0].range.as_deref(), Some("bytes=500000-"));
    assert_eq!(requests[0].if_range, None);
    assert_eq!(requests[1].range, None, "second try starts from scratch");
}

#[test]
fn complete_partial_is_verified_without_downloading_again() {
    let fx = Fixture::new();
    let data = random_bytes(LEN, 9);
    let url = fx.server.add_bytes("/disk.qcow2", data.clone());
    fs_err::create_dir_all(fx.partial.parent().unwrap()).unwrap();
    fs_err::write(&fx.partial, &data).unwrap();

    let got = fx.get(&url, &digest(HashAlgo::Sha256, &data), 1).unwrap();
    assert_complete(&got, &fx, &data);
    let requests = fx.server.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].status, 416);
}

#[test]
fn not_found_names_the_status_and_url_and_is_not_retried() {
    let fx = Fixture::new();
    let url = fx.server.url("/missing.qcow2");
    let err = fx.get(&url, &digest(HashAlgo::Sha256, b""), 3).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("404"), "{msg}");
    assert!(msg.contains(&format!("`{url}`")), "{msg}");
    assert!(msg.contains("hint:"), "{msg}");
    assert_eq!(fx.server.request_count(), 1, "a 404 is not worth retrying");
}

#[test]
fn server_errors_are_retried_up_to_the_attempt_limit() {
    let fx = Fixture::new();
    let url = fx.server.route("/busy.qcow2", Route::status(503));
    let err = fx.get(&url, &digest(HashAlgo::Sha256, b""), 2).unwrap_err();
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(fx.server.request_count(), 2);
}

#[test]
fn connection_refused_says_so_with_a_hint() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let fx = Fixture::new();
    let url = format!("http://127.0.0.1:{port}/disk.qcow2");
    let err = fx.get(&url, &digest(HashAlgo::Sha256, b""), 1).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, FetchError::ConnectionRefused { .. }),
        "{err:?}"
    );
    assert!(
        msg.contains("connection refused") && msg.contains(&url),
        "{msg}"
    );
    assert!(msg.contains("hint:"), "{msg}");
}

fn compress(format: Compression, data: &[u8]) -> Vec<u8> {
    match format {
        Compression::None => data.to_vec(),
        Compression::Xz => {
            let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(data, 1).unwrap(),
        Compression::Bzip2 => {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
    }
}

/// Compressible but not trivial: what a disk image with some structure looks like.
fn image_like(len: usize) -> Vec<u8> {
    let noise = random_bytes(len / 4 + 1, 10);
    (0..len)
        .map(|i| {
            if i % 4 == 0 {
                noise[i / 4]
            } else {
                (i / 4096) as u8
            }
        })
        .collect()
}

fn decompress_to(src: &Path, format: Compression, dest: &Path) -> (u64, ContentHash) {
    decompress(src, format, dest, &ProgressBar::hidden()).unwrap()
}

#[test]
fn every_compression_round_trips_and_is_detected_by_magic() {
    let data = image_like(2 * 1024 * 1024 + 7);
    for format in [
        Compression::None,
        Compression::Xz,
        Compression::Gzip,
        Compression::Zstd,
        Compression::Bzip2,
    ] {
        let fx = Fixture::new();
        let packed = compress(format, &data);
        // No telling suffix: detection must come from the bytes.
        let url = fx.server.add_bytes("/image", packed.clone());
        let got = fx.get(&url, &digest(HashAlgo::Sha256, &packed), 1).unwrap();
        assert_eq!(got.compression, format);
        assert_eq!(got.blake3, ContentHash::of(&packed));

        let out = fx.partial.with_extension("raw");
        let (size, hash) = decompress_to(&got.path, got.compression, &out);
        assert_eq!(size, data.len() as u64, "{format}");
        assert_eq!(hash, ContentHash::of(&data), "{format}");
        assert!(fs_err::read(&out).unwrap() == data, "{format}");
    }
}

#[test]
fn concatenated_streams_decompress_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (image_like(100_000), random_bytes(50_000, 11));
    let whole = [a.clone(), b.clone()].concat();
    for format in [
        Compression::Xz,
        Compression::Gzip,
        Compression::Zstd,
        Compression::Bzip2,
    ] {
        let src = dir.path().join("multi");
        fs_err::write(&src, [compress(format, &a), compress(format, &b)].concat()).unwrap();
        let (size, hash) = decompress_to(&src, format, &dir.path().join("out"));
        assert_eq!(
            (size, hash),
            (whole.len() as u64, ContentHash::of(&whole)),
            "{format}"
        );
    }
}

#[test]
fn url_suffix_is_the_fallback_when_magic_says_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    fs_err::write(&path, b"QFI\xfb plain qcow2 header").unwrap();
    assert_eq!(
        Compression::detect(&path, "http://h/x.img.gz").unwrap(),
        Compression::Gzip
    );
    assert_eq!(
        Compression::detect(&path, "http://h/x.qcow2").unwrap(),
        Compression::None
    );
    fs_err::write(&path, compress(Compression::Zstd, b"abc")).unwrap();
    assert_eq!(
        Compression::detect(&path, "http://h/x.img.gz").unwrap(),
        Compression::Zstd
    );
}

#[test]
fn download_works_when_called_from_inside_a_tokio_runtime() {
    let fx = Fixture::new();
    let data = random_bytes(LEN, 12);
    let url = fx.server.add_bytes("/disk.qcow2", data.clone());
    let expected = digest(HashAlgo::Sha256, &data);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let got = runtime
        .block_on(async { fx.get(&url, &expected, 1) })
        .unwrap();
    assert_complete(&got, &fx, &data);
}

#[test]
fn files_served_from_a_directory_resume_at_the_right_offset() {
    let served = tempfile::tempdir().unwrap();
    let path = served.path().join("images").join("disk.raw");
    fs_err::create_dir_all(path.parent().unwrap()).unwrap();
    http_server::write_random_file(&path, LEN as u64, 13).unwrap();
    let data = fs_err::read(&path).unwrap();

    let mut fx = Fixture::new();
    fx.server = TestServer::serve_dir(served.path());
    let url = fx.server.url("/images/disk.raw");
    fx.server.set_fault(Some(Fault {
        close_after_bytes: 1_234_567,
        first_requests: 1,
    }));
    let got = fx.get(&url, &digest(HashAlgo::Sha256, &data), 2).unwrap();
    assert_complete(&got, &fx, &data);
    let requests = fx.server.requests();
    assert_eq!(requests[1].range.as_deref(), Some("bytes=1234567-"));
    assert_eq!(requests[1].status, 206);
    let missing = fx.server.url("/images/other.raw");
    let err = fx
        .get(&missing, &digest(HashAlgo::Sha256, b""), 1)
        .unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
}

/// A server that answers each connection with `respond` (given the request head), for
/// responses the test server will not give: silence, or more bytes than announced.
fn raw_server(respond: impl Fn(&str, std::net::TcpStream) + Send + 'static) -> String {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            respond(&head, conn);
        }
    });
    format!("http://{addr}/disk.qcow2")
}

#[test]
fn a_server_that_stops_sending_is_a_stall_naming_the_url_and_timeout_and_is_retried() {
    let fx = Fixture::new();
    let data = random_bytes(1 << 20, 11);
    let body = data.clone();
    let held = std::sync::Mutex::new(Vec::new());
    // Headers and half the body, then silence with the connection held open.
    let url = raw_server(move |_, mut conn| {
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
        conn.write_all(head.as_bytes()).unwrap();
        conn.write_all(&body[..body.len() / 2]).unwrap();
        held.lock().unwrap().push(conn);
    });
    let expected = digest(HashAlgo::Sha256, &data);
    let (result, said) = fx.get_telling(&url, &expected, 2, std::time::Duration::from_secs(1));
    let err = result.unwrap_err();
    assert!(matches!(err, FetchError::Stalled { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&format!(
            "`{url}` sent nothing for 1 s (after 524288 bytes)"
        )),
        "{message}"
    );
    assert!(
        message.contains("hint:") && message.contains("--fetch-timeout"),
        "{message}"
    );
    // This server ignores `Range`, so the retry starts over, and says so.
    assert_eq!(said.len(), 2, "{said:?}");
    assert!(
        said[0].starts_with("warning: attempt 1 of 2 failed: `"),
        "{said:?}"
    );
    assert!(
        said[1].contains("sent the whole file instead of the missing part"),
        "{said:?}"
    );
    assert_eq!(
        fx.partial_len(),
        Some(1 << 19),
        "the stalled bytes are kept for a resume"
    );
}

#[test]
fn a_resumed_response_longer_than_it_announced_is_cut_off() {
    let fx = Fixture::new();
    let data = random_bytes(1 << 20, 12);
    let half = data.len() / 2;
    fs_err::create_dir_all(fx.partial.parent().unwrap()).unwrap();
    fs_err::write(&fx.partial, &data[..half]).unwrap();
    let body = data.clone();
    let url = raw_server(move |head, mut conn| {
        assert!(head.contains(&format!("bytes={half}-")), "{head}");
        let mut rest = body[half..].to_vec();
        rest.extend_from_slice(b"and then some junk the server should not have sent");
        let reply = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {half}-{}/{}\r\nContent-Length: {}\r\n\r\n",
            body.len() - 1,
            body.len(),
            rest.len()
        );
        conn.write_all(reply.as_bytes()).unwrap();
        conn.write_all(&rest).unwrap();
    });
    let expected = digest(HashAlgo::Sha256, &data);
    let (result, said) = fx.get_telling(&url, &expected, 1, farm::fetch::DEFAULT_STALL_TIMEOUT);
    let got = result.unwrap();
    assert_eq!(fs_err::read(&got.path).unwrap(), data);
    assert!(
        said.iter().any(|l| l.contains(&format!(
            "sent more than the {} bytes it announced; the rest was cut off",
            data.len()
        ))),
        "{said:?}"
    );
}

/// A 1 MiB tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "farm-test-full"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a small tmpfs needs root (CI runs as root; so does scripts/setup.sh)"
        );
        Self { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_download_that_does_not_fit_is_refused_before_a_byte_is_written() {
    let disk = SmallDisk::mount();
    let mut fx = Fixture::new();
    fx.partial = disk.dir.path().join("tmp").join("image.part");
    let data = random_bytes(4 << 20, 13);
    let url = fx.server.add_bytes("/disk.qcow2", data.clone());
    let expected = digest(HashAlgo::Sha256, &data);
    let err = fx.get(&url, &expected, 3).unwrap_err();
    assert!(matches!(err, FetchError::Space(_)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&format!("Not enough space for the download of `{url}`")),
        "{message}"
    );
    assert!(
        message.contains("(the tmpfs filesystem mounted at `")
            && message.contains("about 4.00 MiB needed"),
        "{message}"
    );
    assert!(message.contains("hint:"), "{message}");
    assert_eq!(fx.partial_len(), None, "nothing is left");
    assert!(!fx.sidecar().exists());
    assert_eq!(fx.server.request_count(), 1, "a full disk is not retried");
}
