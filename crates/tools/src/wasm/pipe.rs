//! The module's stdout and stderr: in-memory pipes that keep the first bytes written, up to
//! a cap, and drop the rest without failing the writer.
//!
//! wasmtime-wasi's `MemoryOutputPipe` reports a full pipe as a closed stream, which makes
//! the guest's `fd_write` fail (a Rust guest panics on it and traps). A module that logs too
//! much should keep running with its excess output dropped, and the tool should say so.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;
use wasmtime_wasi::async_trait;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// How many bytes one write permit (`check_write`) allows; the guest asks again for more.
const WRITE_PERMIT_BYTES: usize = 64 * 1024;

/// An output pipe keeping at most `cap` bytes. Clones share the buffer.
#[derive(Clone)]
pub(super) struct CappedPipe {
    buffer: Arc<Mutex<BytesMut>>,
    cap: usize,
    overflowed: Arc<AtomicBool>,
}

impl CappedPipe {
    /// An empty pipe keeping at most `cap` bytes.
    pub(super) fn new(cap: usize) -> Self {
        Self {
            buffer: Arc::default(),
            cap,
            overflowed: Arc::default(),
        }
    }

    /// The bytes kept.
    pub(super) fn contents(&self) -> Bytes {
        self.lock().clone().freeze()
    }

    /// Whether bytes were written past the cap (and dropped).
    pub(super) fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BytesMut> {
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn keep(&self, bytes: &[u8]) {
        let mut buffer = self.lock();
        let room = self.cap.saturating_sub(buffer.len());
        if bytes.len() > room {
            self.overflowed.store(true, Ordering::Release);
        }
        buffer.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

#[async_trait]
impl OutputStream for CappedPipe {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.keep(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(WRITE_PERMIT_BYTES)
    }
}

#[async_trait]
impl Pollable for CappedPipe {
    async fn ready(&mut self) {}
}

impl AsyncWrite for CappedPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.keep(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}
