//! Binary caches: pushing store entries to a cache, and substituting — getting an entry
//! from a cache instead of building it — each record checked against farm.toml's
//! `trusted-public-keys` and every file against its hash before anything is committed.
//!
//! Caches live in a directory (`file://`), on a web server (`http(s)://`) or in an S3
//! bucket (`s3://`). The format is in docs/binary-cache.md. This floor sits above `store` and `fetch`, below
//! `build` (which substitutes before it builds).

pub mod backend;
mod blob;
mod blocking;
mod file;
mod http;
pub mod keys;
mod oci;
mod open;
pub mod push;
mod s3;
pub mod substitute;

pub use backend::{Backend, BackendError, Timeouts};
pub use oci::Registry;
pub use open::open;
pub use push::{PushReport, push, push_snapshot};
pub use substitute::{Offer, SubstituteError, Substituters};
