//! A small HTTP/1.1 server on 127.0.0.1 for tests and benchmarks.
//!
//! Why not a crate: tests must run without network and must be able to misbehave on purpose
//! (drop connections mid-body, ignore `Range`), which off-the-shelf servers make awkward.
//! Why std (plus `fs_err` and `libc`, already dependencies of farm): it is shared by several
//! test crates and the download benchmark, so it must build with what every test already has.
//!
//! Include it with `#[path = "support/http_server.rs"] mod http_server;` (or from a
//! `tests/support/mod.rs`). It never refers to `crate::`, so it works at any module depth.
//!
//! ```ignore
//! let server = TestServer::start();
//! let url = server.add_bytes("/disk.img", data);
//! server.set_fault(Fault { close_after_bytes: 1000, first_requests: 1 });
//! // ... download `url` ...
//! assert_eq!(server.range_headers(), vec![None, Some("bytes=1000-".into())]);
//! ```
//!
//! File bodies are sent with `sendfile(2)` on Linux (see `send_file`), so the server is not
//! the bottleneck of the download benchmark.

// Each including test crate uses a different subset of the API.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::UNIX_EPOCH;

/// What a path serves.
#[derive(Clone, Debug)]
pub enum Body {
    /// Bytes held in memory; cheap to clone thanks to the `Arc`.
    Bytes(Arc<Vec<u8>>),
    /// A file read at request time, so tests can change it between requests.
    File(PathBuf),
}

/// How a route responds; build one with [`Route::bytes`] / [`Route::file`] and adjust.
#[derive(Clone, Debug)]
pub struct Route {
    pub body: Body,
    /// The ETag sent (quotes included). `None` derives one from the content's size and
    /// mtime (files) or a hash of the bytes, so it changes when the content does.
    pub etag: Option<String>,
    /// Send no ETag at all, to exercise clients that resume without a validator.
    pub no_etag: bool,
    /// Answer this status with an empty body instead of serving the content (e.g. 404, 503).
    pub status: Option<u16>,
}

impl Route {
    pub fn bytes(data: impl Into<Vec<u8>>) -> Self {
        Self::new(Body::Bytes(Arc::new(data.into())))
    }

    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self::new(Body::File(path.into()))
    }

    pub fn status(code: u16) -> Self {
        let mut route = Self::new(Body::Bytes(Arc::new(Vec::new())));
        route.status = Some(code);
        route
    }

    fn new(body: Body) -> Self {
        Self {
            body,
            etag: None,
            no_etag: false,
            status: None,
        }
    }
}

/// Misbehaviour: on the first `first_requests` requests that serve a body, send the headers
/// (with the full Content-Length) and then only `close_after_bytes` bytes of the body, then
/// close the connection, as a flaky network or an overloaded mirror does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub close_after_bytes: u64,
    pub first_requests: usize,
}

/// One request as the server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub if_range: Option<String>,
    /// The status the server answered with.
    pub status: u16,
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Route>,
    /// Serves `/<relative path>` from this directory when no route matches.
    dir: Option<PathBuf>,
    ignore_range: bool,
    fault: Option<Fault>,
    faults_done: usize,
    requests: Vec<RecordedRequest>,
}

/// The server; it stops accepting when dropped. Connections are served on their own threads.
pub struct TestServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server on an ephemeral 127.0.0.1 port with no routes.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let state = Arc::clone(&state);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("test-http-accept".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(conn) = conn else { continue };
                        let state = Arc::clone(&state);
                        let _ = std::thread::Builder::new()
                            .name("test-http-conn".into())
                            .spawn(move || {
                                let _ = serve_connection(conn, &state);
                            });
                    }
                })
                .expect("spawn acceptor")
        };
        Self {
            addr,
            state,
            stop,
            acceptor: Some(acceptor),
        }
    }

    /// Starts a server that serves the files under `dir` as `/<relative path>`.
    pub fn serve_dir(dir: impl Into<PathBuf>) -> Self {
        let server = Self::start();
        server.lock().dir = Some(dir.into());
        server
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The full URL of `path` (which starts with `/`) on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Adds or replaces a route; returns its URL.
    pub fn route(&self, path: &str, route: Route) -> String {
        self.lock().routes.insert(path.to_string(), route);
        self.url(path)
    }

    pub fn add_bytes(&self, path: &str, data: impl Into<Vec<u8>>) -> String {
        self.route(path, Route::bytes(data))
    }

    pub fn add_file(&self, path: &str, file: impl Into<PathBuf>) -> String {
        self.route(path, Route::file(file))
    }

    /// When set, `Range` is ignored and every response is a full 200, like many simple servers.
    pub fn set_ignore_range(&self, ignore: bool) {
        self.lock().ignore_range = ignore;
    }

    /// Installs (or clears) a [`Fault`]; its request count starts from zero again.
    pub fn set_fault(&self, fault: Option<Fault>) {
        let mut state = self.lock();
        state.fault = fault;
        state.faults_done = 0;
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    pub fn request_count(&self) -> usize {
        self.lock().requests.len()
    }

    /// The `Range` header of every request so far (`None` where there was none).
    pub fn range_headers(&self) -> Vec<Option<String>> {
        self.lock()
            .requests
            .iter()
            .map(|r| r.range.clone())
            .collect()
    }

    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor so it sees `stop`.
        let _ = TcpStream::connect(self.addr);
        if let Some(handle) = self.acceptor.take() {
            let _ = handle.join();
        }
    }
}

/// A panicking test thread must not turn every later lock into a second panic.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one request head; `Ok(None)` on a clean close between requests.
fn read_request(reader: &mut BufReader<TcpStream>) -> io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or("/").to_string();
    // Absolute-form targets (from proxies) are reduced to their path.
    let path = match target.find("://") {
        Some(i) => target[i + 3..]
            .find('/')
            .map_or("/".to_string(), |j| target[i + 3 + j..].to_string()),
        None => target,
    };
    let path = path.split('?').next().unwrap_or("/").to_string();
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            return Ok(None);
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let request = Request {
        method,
        path,
        headers,
    };
    // Discard any request body so keep-alive stays in sync.
    if let Some(len) = request
        .header("content-length")
        .and_then(|v| v.parse::<u64>().ok())
    {
        io::copy(&mut reader.by_ref().take(len), &mut io::sink())?;
    }
    Ok(Some(request))
}

fn serve_connection(stream: TcpStream, state: &Mutex<State>) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    while let Some(request) = read_request(&mut reader)? {
        let keep_alive = respond(&request, &mut out, state)?;
        if !keep_alive {
            let _ = out.shutdown(Shutdown::Both);
            break;
        }
    }
    Ok(())
}

/// The content of a route, resolved at request time.
enum Content {
    Bytes(Arc<Vec<u8>>),
    File(PathBuf, u64),
}

impl Content {
    fn len(&self) -> u64 {
        match self {
            Content::Bytes(b) => b.len() as u64,
            Content::File(_, len) => *len,
        }
    }
}

fn default_etag(body: &Body) -> Option<String> {
    match body {
        Body::Bytes(b) => {
            // FNV-1a: any content change gives a different tag, without a hashing dependency.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for &byte in b.iter() {
                h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
            Some(format!("\"{:x}-{h:016x}\"", b.len()))
        }
        Body::File(path) => {
            let meta = fs_err::metadata(path).ok()?;
            let mtime = meta
                .modified()
                .ok()?
                .duration_since(UNIX_EPOCH)
                .ok()?
                .as_nanos();
            Some(format!("\"{:x}-{mtime:x}\"", meta.len()))
        }
    }
}

/// Parses `bytes=N-` or `bytes=N-M` (single ranges only; that is all clients here send).
fn parse_range(value: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = value.trim().strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = match end.trim() {
        "" => len.saturating_sub(1),
        e => e.parse::<u64>().ok()?.min(len.saturating_sub(1)),
    };
    if start >= len || end < start {
        return Some(Err(()));
    }
    Some(Ok((start, end)))
}

/// Writes one response; returns whether the connection may be kept alive.
fn respond(request: &Request, out: &mut TcpStream, state: &Mutex<State>) -> io::Result<bool> {
    let range = request.header("range").map(str::to_string);
    let if_range = request.header("if-range").map(str::to_string);
    let record = |status: u16| {
        lock(state).requests.push(RecordedRequest {
            method: request.method.clone(),
            path: request.path.clone(),
            range: range.clone(),
            if_range: if_range.clone(),
            status,
        });
    };

    let (route, dir, ignore_range) = {
        let st = lock(state);
        (
            st.routes.get(&request.path).cloned(),
            st.dir.clone(),
            st.ignore_range,
        )
    };
    let route = route.or_else(|| {
        let dir = dir?;
        let rel = request.path.trim_start_matches('/');
        if rel.split('/').any(|c| c == "..") {
            return None;
        }
        let path = dir.join(rel);
        path.is_file().then(|| Route::file(path))
    });
    let Some(route) = route else {
        record(404);
        write_head(out, 404, "Not Found", &[("Content-Length", "0".into())])?;
        return Ok(true);
    };
    if let Some(code) = route.status {
        record(code);
        write_head(out, code, reason(code), &[("Content-Length", "0".into())])?;
        return Ok(true);
    }

    let content = match &route.body {
        Body::Bytes(b) => Content::Bytes(Arc::clone(b)),
        Body::File(path) => match fs_err::metadata(path) {
            Ok(meta) => Content::File(path.clone(), meta.len()),
            Err(_) => {
                record(404);
                write_head(out, 404, "Not Found", &[("Content-Length", "0".into())])?;
                return Ok(true);
            }
        },
    };
    let etag = if route.no_etag {
        None
    } else {
        route.etag.clone().or_else(|| default_etag(&route.body))
    };
    let total = content.len();

    // If-Range: honour Range only when the validator still matches the current content.
    let validator_ok = match (&if_range, &etag) {
        (None, _) => true,
        (Some(v), Some(tag)) => v == tag,
        (Some(_), None) => false,
    };
    let parsed = match (&range, ignore_range || !validator_ok) {
        (Some(r), false) => parse_range(r, total),
        _ => None,
    };

    let mut headers: Vec<(&str, String)> = vec![("Accept-Ranges", "bytes".into())];
    if let Some(tag) = &etag {
        headers.push(("ETag", tag.clone()));
    }
    let (status, start, len) = match parsed {
        Some(Err(())) => {
            record(416);
            headers.push(("Content-Range", format!("bytes */{total}")));
            headers.push(("Content-Length", "0".into()));
            write_head(out, 416, "Range Not Satisfiable", &headers)?;
            return Ok(true);
        }
        Some(Ok((start, end))) => {
            headers.push(("Content-Range", format!("bytes {start}-{end}/{total}")));
            (206, start, end - start + 1)
        }
        None => (200, 0, total),
    };
    headers.push(("Content-Length", len.to_string()));
    headers.push(("Content-Type", "application/octet-stream".into()));
    record(status);

    let head_only = request.method.eq_ignore_ascii_case("HEAD");
    let cut = if head_only {
        None
    } else {
        let mut st = lock(state);
        match st.fault {
            Some(f) if st.faults_done < f.first_requests => {
                st.faults_done += 1;
                Some(f.close_after_bytes.min(len))
            }
            _ => None,
        }
    };
    if cut.is_some() {
        headers.push(("Connection", "close".into()));
    }
    write_head(out, status, reason(status), &headers)?;
    if head_only {
        return Ok(true);
    }
    let send = cut.unwrap_or(len);
    match &content {
        Content::Bytes(b) => {
            out.write_all(&b[start as usize..(start + send) as usize])?;
        }
        Content::File(path, _) => {
            let file = fs_err::File::open(path)?;
            if send_file(file.file(), start, send, out)? < send {
                return Ok(false);
            }
        }
    }
    out.flush()?;
    Ok(cut.is_none())
}

/// Sends `len` bytes of `file` from `offset`. On Linux this is sendfile(2): one kernel copy
/// and no syscall per 8 KiB. (`std::io::copy` from a `File` to a `TcpStream` does NOT use
/// sendfile on current std; it falls back to an 8 KiB stack buffer, which made this server
/// the bottleneck of the download benchmark.) Returns the bytes sent, fewer if the file
/// shrank.
fn send_file(file: &std::fs::File, offset: u64, len: u64, out: &mut TcpStream) -> io::Result<u64> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let mut pos = offset as libc::off_t;
        let mut sent = 0u64;
        while sent < len {
            let want = (len - sent).min(1 << 30) as usize;
            // SAFETY: both descriptors are open for the duration of the call and `pos` is a
            // valid, exclusively borrowed offset.
            let n = unsafe { libc::sendfile(out.as_raw_fd(), file.as_raw_fd(), &mut pos, want) };
            match n {
                0 => return Ok(sent),
                n if n > 0 => sent += n as u64,
                _ => {
                    let err = io::Error::last_os_error();
                    match err.raw_os_error() {
                        Some(libc::EINTR) => continue,
                        // Filesystems without sendfile support: copy through a buffer.
                        Some(libc::EINVAL | libc::ENOSYS) if sent == 0 => break,
                        _ => return Err(err),
                    }
                }
            }
        }
        if sent == len {
            return Ok(sent);
        }
    }
    let mut reader = file;
    reader.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut sent = 0u64;
    while sent < len {
        let want = (len - sent).min(buf.len() as u64) as usize;
        let n = reader.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        sent += n as u64;
    }
    Ok(sent)
}

fn write_head(
    out: &mut TcpStream,
    status: u16,
    reason: &str,
    headers: &[(&str, String)],
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Writes `len` bytes of cheap pseudo-random data to `path` (xorshift; incompressible enough
/// that a compressing layer would not flatter a benchmark, and fast to generate).
pub fn write_random_file(path: &Path, len: u64, seed: u64) -> io::Result<()> {
    let mut file = io::BufWriter::with_capacity(1 << 20, fs_err::File::create(path)?);
    let mut state = xorshift_seed(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        file.write_all(&buf[..n])?;
        left -= n as u64;
    }
    file.flush()
}

/// `len` bytes of the same pseudo-random data, in memory.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = xorshift_seed(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Distinct seeds give distinct (odd, hence non-zero) xorshift states.
fn xorshift_seed(seed: u64) -> u64 {
    (seed << 1) ^ 0x9E37_79B9_7F4A_7C15
}
