//! A server-sent events parser (the `text/event-stream` format of the WHATWG HTML standard,
//! section 9.2.6 "Interpreting an event stream") over a stream of byte chunks.
//!
//! It is small and written here rather than taken from a crate so that it can be bounded:
//! a line or an event larger than [`SseParser::new`]'s limit is an error instead of a buffer
//! that grows with whatever the peer sends.

use std::collections::VecDeque;

use bytes::Bytes;
use futures::stream::{self, Stream, StreamExt};

/// One dispatched event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field; `message` when the event named none.
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The last `id:` seen on the stream so far (the value to resume from).
    pub id: Option<String>,
}

/// An event or line over the parser's bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooLarge {
    /// The bound, in bytes.
    pub bytes_max: usize,
}

/// Incremental parser: feed it chunks, take the events it completed.
#[derive(Debug)]
pub struct SseParser {
    /// The current line, without its ending.
    line: Vec<u8>,
    /// The previous chunk ended with CR: a LF starting the next chunk ends no new line.
    after_cr: bool,
    /// Nothing has been read yet: a leading byte-order mark is dropped.
    at_start: bool,
    event: String,
    data: String,
    has_data: bool,
    last_id: Option<String>,
    /// Bytes of the current line and event so far.
    pending_bytes: usize,
    bytes_max: usize,
}

impl SseParser {
    /// A parser that refuses any line or event larger than `bytes_max` bytes.
    pub fn new(bytes_max: usize) -> Self {
        SseParser {
            line: Vec::new(),
            after_cr: false,
            at_start: true,
            event: String::new(),
            data: String::new(),
            has_data: false,
            last_id: None,
            pending_bytes: 0,
            bytes_max,
        }
    }

    /// Reads a chunk and appends the events it completes to `out`.
    ///
    /// # Errors
    /// [`TooLarge`] when a line or an event passes the bound; the parser must not be fed
    /// again after that.
    pub fn feed(&mut self, mut chunk: &[u8], out: &mut VecDeque<SseEvent>) -> Result<(), TooLarge> {
        if self.at_start && !chunk.is_empty() {
            // A BOM may arrive split across chunks only in theory; the server never sends
            // one, so only a whole one at the start is dropped.
            if let Some(rest) = chunk.strip_prefix(b"\xEF\xBB\xBF") {
                chunk = rest;
            }
            self.at_start = false;
        }
        for &byte in chunk {
            let after_cr = std::mem::replace(&mut self.after_cr, false);
            match byte {
                b'\n' if after_cr => {}
                b'\n' => self.end_line(out),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(out);
                }
                _ => {
                    self.pending_bytes += 1;
                    if self.pending_bytes > self.bytes_max {
                        return Err(TooLarge {
                            bytes_max: self.bytes_max,
                        });
                    }
                    self.line.push(byte);
                }
            }
        }
        Ok(())
    }

    fn end_line(&mut self, out: &mut VecDeque<SseEvent>) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            // A comment (the server's keep-alive).
            self.pending_bytes -= line.len().min(self.pending_bytes);
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (&line[..], &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"event" => self.event = value.into_owned(),
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&value);
                self.has_data = true;
            }
            b"id" if !value.contains('\0') => self.last_id = Some(value.into_owned()),
            // `retry` (reconnection delay) and unknown fields are ignored: the caller decides
            // how to reconnect.
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut VecDeque<SseEvent>) {
        self.pending_bytes = 0;
        let event = std::mem::take(&mut self.event);
        if !std::mem::replace(&mut self.has_data, false) {
            // The standard: an event without data is not dispatched.
            return;
        }
        out.push_back(SseEvent {
            event: if event.is_empty() {
                "message".to_owned()
            } else {
                event
            },
            data: std::mem::take(&mut self.data),
            id: self.last_id.clone(),
        });
    }
}

/// Why an event stream stopped with an error.
#[derive(Debug)]
pub enum StreamError {
    /// Reading the body failed.
    Body(reqwest::Error),
    /// An event was over the bound.
    TooLarge(TooLarge),
}

/// The events of a byte stream, in order; ends when the bytes end (a partial event at the
/// end is dropped, as the standard says).
pub fn events<S>(bytes: S, bytes_max: usize) -> impl Stream<Item = Result<SseEvent, StreamError>>
where
    S: Stream<Item = Result<Bytes, reqwest::Error>> + Send + Unpin,
{
    let state = (bytes, SseParser::new(bytes_max), VecDeque::new(), false);
    stream::unfold(
        state,
        |(mut bytes, mut parser, mut ready, failed)| async move {
            loop {
                if failed {
                    return None;
                }
                if let Some(event) = ready.pop_front() {
                    return Some((Ok(event), (bytes, parser, ready, false)));
                }
                match bytes.next().await? {
                    Ok(chunk) => {
                        if let Err(too_large) = parser.feed(&chunk, &mut ready) {
                            return Some((
                                Err(StreamError::TooLarge(too_large)),
                                (bytes, parser, ready, true),
                            ));
                        }
                    }
                    Err(error) => {
                        return Some((Err(StreamError::Body(error)), (bytes, parser, ready, true)))
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_chunks(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut parser = SseParser::new(1024);
        let mut out = VecDeque::new();
        for chunk in chunks {
            parser.feed(chunk, &mut out).expect("within the bound");
        }
        out.into_iter().collect()
    }

    fn event(event: &str, data: &str, id: Option<&str>) -> SseEvent {
        SseEvent {
            event: event.to_owned(),
            data: data.to_owned(),
            id: id.map(str::to_owned),
        }
    }

    #[test]
    fn events_are_split_on_blank_lines_with_any_line_ending() {
        let events = parse_chunks(&[
            b"id: 1-1\nevent: run\ndata: {\"a\":1}\n\n",
            b"event: log\r\ndata: x\r\n\r\n",
            b"data: plain\r\r",
        ]);
        assert_eq!(
            events,
            vec![
                event("run", "{\"a\":1}", Some("1-1")),
                event("log", "x", Some("1-1")),
                event("message", "plain", Some("1-1")),
            ]
        );
    }

    #[test]
    fn a_chunk_boundary_anywhere_gives_the_same_events() {
        let text: &[u8] = b"\xEF\xBB\xBF: keep-alive\r\nid: 7-2\r\nevent: task_run\r\ndata: one\r\ndata:two\r\n\r\nevent: end\ndata: {}\n\n";
        let whole = parse_chunks(&[text]);
        assert_eq!(
            whole,
            vec![
                event("task_run", "one\ntwo", Some("7-2")),
                event("end", "{}", Some("7-2")),
            ]
        );
        for split in 1..text.len() {
            let (a, b) = text.split_at(split);
            if split < 3 {
                // A byte-order mark split across chunks is not recognised (see `feed`).
                continue;
            }
            assert_eq!(parse_chunks(&[a, b]), whole, "split at {split}");
        }
    }

    #[test]
    fn comments_and_events_without_data_dispatch_nothing() {
        assert_eq!(
            parse_chunks(&[b": ping\n\nevent: lonely\n\nretry: 10\nunknown: x\n\n"]),
            vec![]
        );
    }

    #[test]
    fn an_event_over_the_bound_is_an_error_not_a_growing_buffer() {
        let mut parser = SseParser::new(16);
        let mut out = VecDeque::new();
        assert_eq!(
            parser.feed(b"data: 0123456789abcdef\n", &mut out),
            Err(TooLarge { bytes_max: 16 })
        );
        let mut parser = SseParser::new(16);
        parser.feed(b"data: 0123\n", &mut out).unwrap();
        assert!(parser.feed(b"data: 4567\n", &mut out).is_err());
        // Keep-alives between events do not add up.
        let mut parser = SseParser::new(16);
        for _ in 0..10 {
            parser.feed(b": keep-alive\n", &mut out).unwrap();
        }
        parser.feed(b"data: ok\n\n", &mut out).unwrap();
        assert_eq!(out.len(), 1);
    }
}
