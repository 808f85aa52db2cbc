//! The bridge from async clients (`object_store`, `oci-client`) to the blocking
//! `Backend` trait: a small runtime per backend, and a `Read` over a byte stream.

use std::io::{self, Read};
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;

/// A runtime for one backend's calls: two workers, IO and timers.
pub(super) fn runtime() -> io::Result<Arc<tokio::runtime::Runtime>> {
    Ok(Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
    ))
}

/// A blocking `Read` over an object's byte stream: chunks are handed over as they arrive,
/// never collected whole.
pub(super) struct StreamReader<E> {
    stream: BoxStream<'static, Result<bytes::Bytes, E>>,
    runtime: Arc<tokio::runtime::Runtime>,
    chunk: bytes::Bytes,
}

impl<E> StreamReader<E> {
    pub(super) fn new(
        stream: BoxStream<'static, Result<bytes::Bytes, E>>,
        runtime: Arc<tokio::runtime::Runtime>,
    ) -> Self {
        StreamReader {
            stream,
            runtime,
            chunk: bytes::Bytes::new(),
        }
    }
}

impl<E: Into<Box<dyn std::error::Error + Send + Sync>>> Read for StreamReader<E> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.runtime.block_on(self.stream.next()) {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(io::Error::other(e)),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        Ok(n)
    }
}
