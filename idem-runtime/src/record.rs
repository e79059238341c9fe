//! Recorded responses and their byte encoding.
//!
//! A completed record holds a [`RecordedResult`]: either the response to replay (status, the
//! allow-listed headers, body) or a marker saying the response was too large to record. Stores that
//! keep bytes (Redis) use [`RecordedResult::encode`] and [`RecordedResult::decode`]; the decoder
//! treats its input as untrusted (a corrupted or foreign value must give an error, never a panic or
//! a wrong replay).
//!
//! ```
//! use bytes::Bytes;
//! use http::{HeaderName, HeaderValue, StatusCode};
//! use idem_runtime::record::{RecordedResult, StoredResponse};
//!
//! let result = RecordedResult::Response(StoredResponse {
//!     status: StatusCode::CREATED,
//!     headers: vec![(HeaderName::from_static("location"), HeaderValue::from_static("/p/1"))],
//!     body: Bytes::from_static(b"{\"id\":1}"),
//! });
//! let bytes = result.encode();
//! assert_eq!(RecordedResult::decode(&bytes).unwrap(), result);
//! assert!(RecordedResult::decode(&bytes[..bytes.len() - 1]).is_err());
//! ```

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};

/// Response headers recorded and replayed by default. Everything else (hop-by-hop headers,
/// `Set-Cookie`, `Date`, request ids, rate-limit headers, …) is dropped.
pub const DEFAULT_REPLAYED_HEADERS: &[HeaderName] = &[
    header::CONTENT_TYPE,
    header::CONTENT_LANGUAGE,
    header::CONTENT_ENCODING,
    header::CONTENT_DISPOSITION,
    header::CONTENT_LOCATION,
    header::LOCATION,
    header::ETAG,
    header::LAST_MODIFIED,
    header::LINK,
    header::VARY,
];

/// Headers that are never recorded, even when a user adds them to the allow-list.
const NEVER_RECORDED: &[HeaderName] = &[
    header::SET_COOKIE,
    header::AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::WWW_AUTHENTICATE,
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::CONTENT_LENGTH,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::DATE,
];

/// What a completed record holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordedResult {
    /// The first response, to be replayed.
    Response(StoredResponse),
    /// The first response was larger than the storage limit: duplicates get `409
    /// result-unavailable` instead of running the handler again.
    TooLarge,
}

/// A response as recorded: status, allow-listed headers and the whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The response status.
    pub status: StatusCode,
    /// Recorded headers, in their original order.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The whole body.
    pub body: Bytes,
}

impl StoredResponse {
    /// Keeps the headers of `from` that are in `allowed` (and not in the never-recorded list).
    pub fn filter_headers(
        from: &HeaderMap,
        allowed: &[HeaderName],
    ) -> Vec<(HeaderName, HeaderValue)> {
        from.iter()
            .filter(|(name, _)| allowed.contains(name) && !NEVER_RECORDED.contains(name))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect()
    }

    /// An estimate of the memory the response occupies, for byte-bounded caches.
    pub fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 64)
            .sum();
        self.body.len() + headers + 64
    }
}

impl RecordedResult {
    /// An estimate of the memory the result occupies, for byte-bounded caches.
    pub fn weight(&self) -> usize {
        match self {
            Self::Response(response) => response.weight(),
            Self::TooLarge => 16,
        }
    }
}

/// A stored value that is not a valid encoded record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("corrupt stored record: {0}")]
pub struct DecodeError(&'static str);

impl DecodeError {
    /// An error for a stored value that fails a check outside [`RecordedResult::decode`] (a
    /// store's other record fields).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) const fn new(reason: &'static str) -> Self {
        Self(reason)
    }
}

const MAGIC: &[u8; 4] = b"idr1";
const KIND_RESPONSE: u8 = 1;
const KIND_TOO_LARGE: u8 = 2;

impl RecordedResult {
    /// Encodes the result: magic, kind, status, headers (u16 counts and lengths), body (u32 length).
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.weight());
        out.put_slice(MAGIC);
        match self {
            Self::TooLarge => out.put_u8(KIND_TOO_LARGE),
            Self::Response(response) => {
                out.put_u8(KIND_RESPONSE);
                out.put_u16(response.status.as_u16());
                // Header names and values are bounded by the HTTP layer far below u16::MAX, and
                // a response has far fewer than 65 536 allow-listed headers; truncate defensively.
                let headers =
                    &response.headers[..response.headers.len().min(usize::from(u16::MAX))];
                put_len16(&mut out, headers.len());
                for (name, value) in headers {
                    put_bytes16(&mut out, name.as_str().as_bytes());
                    put_bytes16(&mut out, value.as_bytes());
                }
                let body_len = u32::try_from(response.body.len()).unwrap_or(u32::MAX);
                out.put_u32(body_len);
                out.put_slice(&response.body[..body_len as usize]);
            }
        }
        out.freeze()
    }

    /// Decodes bytes written by [`RecordedResult::encode`]. Never panics; rejects trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader(bytes);
        if reader.take(4)? != MAGIC {
            return Err(DecodeError("unknown format"));
        }
        let result = match reader.u8()? {
            KIND_TOO_LARGE => Self::TooLarge,
            KIND_RESPONSE => {
                let status = StatusCode::from_u16(reader.u16()?)
                    .map_err(|_| DecodeError("invalid status"))?;
                let count = reader.u16()?;
                let mut headers = Vec::with_capacity(usize::from(count).min(64));
                for _ in 0..count {
                    let len = reader.u16()?;
                    let name = HeaderName::from_bytes(reader.take(usize::from(len))?)
                        .map_err(|_| DecodeError("invalid header name"))?;
                    // A record idem wrote never holds these; one that does was written by
                    // someone else and must not make a replay set a cookie or a length.
                    if NEVER_RECORDED.contains(&name) {
                        return Err(DecodeError("a header that is never recorded"));
                    }
                    let len = reader.u16()?;
                    let value = HeaderValue::from_bytes(reader.take(usize::from(len))?)
                        .map_err(|_| DecodeError("invalid header value"))?;
                    headers.push((name, value));
                }
                let len = reader.u32()?;
                let body = Bytes::copy_from_slice(reader.take(len as usize)?);
                Self::Response(StoredResponse {
                    status,
                    headers,
                    body,
                })
            }
            _ => return Err(DecodeError("unknown record kind")),
        };
        if !reader.0.is_empty() {
            return Err(DecodeError("trailing bytes"));
        }
        Ok(result)
    }
}

fn put_len16(out: &mut BytesMut, len: usize) {
    out.put_u16(u16::try_from(len).unwrap_or(u16::MAX));
}

fn put_bytes16(out: &mut BytesMut, bytes: &[u8]) {
    let bytes = &bytes[..bytes.len().min(usize::from(u16::MAX))];
    put_len16(out, bytes.len());
    out.put_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RecordedResult {
        RecordedResult::Response(StoredResponse {
            status: StatusCode::PAYMENT_REQUIRED,
            headers: vec![
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (header::LOCATION, HeaderValue::from_static("/payments/7")),
            ],
            body: Bytes::from_static(b"{\"declined\":true}"),
        })
    }

    #[test]
    fn round_trips() {
        for result in [sample(), RecordedResult::TooLarge] {
            assert_eq!(RecordedResult::decode(&result.encode()), Ok(result));
        }
        let empty = RecordedResult::Response(StoredResponse {
            status: StatusCode::NO_CONTENT,
            headers: vec![],
            body: Bytes::new(),
        });
        assert_eq!(RecordedResult::decode(&empty.encode()), Ok(empty));
    }

    #[test]
    fn every_truncation_and_extension_is_rejected() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(
                RecordedResult::decode(&bytes[..len]).is_err(),
                "prefix of {len} bytes"
            );
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(
            RecordedResult::decode(&longer),
            Err(DecodeError("trailing bytes"))
        );
    }

    #[test]
    fn foreign_values_are_rejected() {
        assert!(RecordedResult::decode(b"").is_err());
        assert!(RecordedResult::decode(b"{\"status\":200}").is_err());
        assert!(RecordedResult::decode(b"idr1\x09").is_err());
        assert!(
            RecordedResult::decode(b"idr1\x01\x00\x00\x00\x00\x00\x00\x00\x00").is_err(),
            "status 0"
        );
        let mut bad_name = b"idr1\x01\x00\xc8\x00\x01\x00\x02a ".to_vec();
        bad_name.extend_from_slice(b"\x00\x00\x00\x00\x00\x00");
        assert_eq!(
            RecordedResult::decode(&bad_name),
            Err(DecodeError("invalid header name"))
        );
        // A header idem never records, in a value someone else wrote, is not replayed.
        let cookie = b"idr1\x01\x00\xc8\x00\x01\x00\x0aset-cookie\x00\x03a=1\x00\x00\x00\x00";
        assert_eq!(
            RecordedResult::decode(cookie),
            Err(DecodeError("a header that is never recorded"))
        );
        // A huge declared body length must not allocate or panic.
        assert!(RecordedResult::decode(b"idr1\x01\x00\xc8\x00\x00\xff\xff\xff\xff").is_err());
    }

    #[test]
    fn header_filter_keeps_only_the_allow_list() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::SET_COOKIE, HeaderValue::from_static("session=1"));
        headers.insert(header::DATE, HeaderValue::from_static("now"));
        headers.insert("x-request-id", HeaderValue::from_static("abc"));
        headers.insert("x-ratelimit-remaining", HeaderValue::from_static("9"));
        headers.insert(header::LOCATION, HeaderValue::from_static("/p/1"));
        let mut allowed = DEFAULT_REPLAYED_HEADERS.to_vec();
        allowed.push(header::SET_COOKIE);
        let kept = StoredResponse::filter_headers(&headers, &allowed);
        let names: Vec<_> = kept.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["content-type", "location"]);
    }
}
