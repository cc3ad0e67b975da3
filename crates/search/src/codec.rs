//! Little-endian binary encoding of the vector index's snapshot and log records, with bounds
//! checks that report damage as [`SearchError::Corrupt`] instead of panicking.

use arches_core::search::{Metadata, SearchError};

/// Appends values to a byte buffer.
#[derive(Default)]
pub(crate) struct Writer {
    pub(crate) bytes: Vec<u8>,
}

impl Writer {
    pub(crate) fn u8(&mut self, v: u8) {
        self.bytes.push(v);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }
    /// A length-prefixed (u32) byte string.
    pub(crate) fn blob(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.bytes.extend_from_slice(v);
    }
    pub(crate) fn f32s(&mut self, v: &[f32]) {
        self.bytes.reserve(v.len() * 4);
        for x in v {
            self.bytes.extend_from_slice(&x.to_le_bytes());
        }
    }
}

/// Reads values from a byte slice; every read past the end is [`SearchError::Corrupt`].
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'a str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], what: &'a str) -> Self {
        Self { bytes, at: 0, what }
    }

    pub(crate) fn corrupt(&self, reason: impl Into<String>) -> SearchError {
        SearchError::Corrupt {
            what: self.what.to_owned(),
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], SearchError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| self.corrupt(format!("truncated at byte {}", self.at)))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, SearchError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, SearchError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, SearchError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    pub(crate) fn blob(&mut self) -> Result<&'a [u8], SearchError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub(crate) fn string(&mut self) -> Result<String, SearchError> {
        let b = self.blob()?;
        String::from_utf8(b.to_vec()).map_err(|_| self.corrupt("a string is not UTF-8"))
    }
    pub(crate) fn metadata(&mut self) -> Result<Metadata, SearchError> {
        let b = self.blob()?;
        serde_json::from_slice(b).map_err(|e| self.corrupt(format!("bad metadata: {e}")))
    }
    pub(crate) fn f32s(&mut self, n: usize, out: &mut Vec<f32>) -> Result<(), SearchError> {
        let bytes = n
            .checked_mul(4)
            .ok_or_else(|| self.corrupt("vector length overflows"))?;
        let b = self.take(bytes)?;
        out.extend(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        Ok(())
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.at == self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reports_truncation() {
        let mut w = Writer::default();
        w.u8(7);
        w.u32(42);
        w.u64(1 << 40);
        w.blob(b"hello");
        w.f32s(&[1.5, -2.0]);
        let mut r = Reader::new(&w.bytes, "test");
        assert_eq!(r.u8().unwrap(), 7);
        assert_eq!(r.u32().unwrap(), 42);
        assert_eq!(r.u64().unwrap(), 1 << 40);
        assert_eq!(r.string().unwrap(), "hello");
        let mut v = Vec::new();
        r.f32s(2, &mut v).unwrap();
        assert_eq!(v, [1.5, -2.0]);
        assert!(r.is_empty());
        let mut short = Reader::new(&w.bytes[..6], "test");
        short.u8().unwrap();
        short.u32().unwrap();
        assert!(matches!(short.u64(), Err(SearchError::Corrupt { .. })));
    }
}
