//! Where the tests keep what they build, between runs on one machine: the test store
//! (farm's own store, content-addressed), the image fixtures (keyed by their recipe) and the
//! labs' state directories (keyed by their farm.toml; a lab's snapshot restores only from the
//! state directory that saved it).
//!
//! It lives outside the clone, at a fixed path, so that a second clean-clone run on the same
//! machine finds every fixture built; `scripts/test.sh` verifies the store before a run. A
//! fresh machine starts with nothing here. `FARM_TEST_HOME` moves it (a benchmark or a
//! developer who wants a private one); `FARM_TEST_STORE` moves the store alone.
//!
//! Benchmarks include this file with `#[path]`: it refers to nothing else of the tests.

use std::path::PathBuf;

/// The default home, outside any clone: `/var/tmp` outlives reboots and is not a tmpfs.
const DEFAULT_HOME: &str = "/var/tmp/farm-tests";

/// The root of everything the tests keep.
pub fn test_home() -> PathBuf {
    std::env::var_os("FARM_TEST_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_HOME))
}

/// The store shared by every VM test and benchmark of a run, and by the runs after it.
pub fn shared_store() -> PathBuf {
    std::env::var_os("FARM_TEST_STORE")
        .map(PathBuf::from)
        .unwrap_or_else(|| test_home().join("store"))
}

/// Image fixtures that are files, not store entries (a cloud image as users download it).
pub fn fixtures_dir() -> PathBuf {
    test_home().join("fixtures")
}

/// The project directories of the shared labs (see `support::lab`).
pub fn labs_dir() -> PathBuf {
    test_home().join("labs")
}
