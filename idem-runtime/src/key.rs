//! Parsing the `Idempotency-Key` request header.
//!
//! The IETF draft defines the field as a structured-field string (`"…"`, RFC 8941). Most clients in
//! the wild send the bare form instead (`Idempotency-Key: 8e03978e-40d5-43e8-bc93-6894a57f9324`), so a
//! bare HTTP token (RFC 9110 `tchar`, any first character) is accepted too, and both forms of the same
//! characters name the same key.
//!
//! ```
//! use http::HeaderMap;
//! use idem_runtime::key::{IdempotencyKey, KeyError};
//!
//! let mut headers = HeaderMap::new();
//! headers.insert("idempotency-key", "\"order-42\"".parse().unwrap());
//! let quoted = IdempotencyKey::from_headers(&headers).unwrap().unwrap();
//!
//! headers.insert("idempotency-key", "order-42".parse().unwrap());
//! let bare = IdempotencyKey::from_headers(&headers).unwrap().unwrap();
//! assert_eq!(quoted, bare);
//! assert_eq!(bare.as_str(), "order-42");
//!
//! headers.insert("idempotency-key", "\"\"".parse().unwrap());
//! assert_eq!(IdempotencyKey::from_headers(&headers), Err(KeyError::Empty));
//! ```

use std::fmt;

use http::{HeaderMap, HeaderName, HeaderValue};

/// The request header carrying the key: `Idempotency-Key`.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The longest key accepted, in bytes (after removing the quotes and escapes of an sf-string).
pub const MAX_KEY_LEN: usize = 255;

/// A validated idempotency key: 1 to [`MAX_KEY_LEN`] printable ASCII characters.
///
/// The raw key is client input. idem never logs it and never puts it in a store key name; it only
/// enters the SHA-256 record key (see [`crate::fingerprint::RecordKey`]).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(Box<str>);

/// Why an `Idempotency-Key` header was rejected. Each one is answered with the
/// `idempotency-key-invalid` problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The request carried more than one `Idempotency-Key` field line.
    #[error("the request has more than one `Idempotency-Key` header")]
    Repeated,
    /// The key is empty (an empty field or `""`).
    #[error("the `Idempotency-Key` header is empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`] bytes.
    #[error("the `Idempotency-Key` is longer than {MAX_KEY_LEN} bytes")]
    TooLong,
    /// The value contains a byte outside printable ASCII (a control character or non-ASCII).
    #[error("the `Idempotency-Key` contains a control or non-ASCII character")]
    BadCharacter,
    /// The value is neither a structured-field string nor a bare HTTP token.
    #[error(
        "the `Idempotency-Key` must be a quoted string (\"...\") or a token of letters, digits and `!#$%&'*+-.^_|~`"
    )]
    Malformed,
}

impl IdempotencyKey {
    /// Reads the key from request headers: `Ok(None)` when the header is absent.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, KeyError> {
        Self::from_header(headers, &IDEMPOTENCY_KEY)
    }

    /// Reads the key from the header `name` (for services that configured another name than
    /// `Idempotency-Key`): `Ok(None)` when it is absent, [`KeyError::Repeated`] when it is there
    /// twice.
    pub fn from_header(headers: &HeaderMap, name: &HeaderName) -> Result<Option<Self>, KeyError> {
        let mut values = headers.get_all(name).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(KeyError::Repeated);
        }
        Self::parse(value).map(Some)
    }

    /// Parses one header value: an RFC 8941 sf-string or a bare RFC 9110 token, surrounded by
    /// optional spaces.
    pub fn parse(value: &HeaderValue) -> Result<Self, KeyError> {
        Self::parse_bytes(value.as_bytes())
    }

    /// Parses the raw bytes of one header value (see [`IdempotencyKey::parse`]).
    pub fn parse_bytes(raw: &[u8]) -> Result<Self, KeyError> {
        let trimmed = raw.trim_ascii();
        // Tabs inside the value, other controls, DEL and obs-text.
        if trimmed.iter().any(|b| !is_visible_ascii(*b) && *b != b' ') {
            return Err(KeyError::BadCharacter);
        }
        let key = match trimmed {
            [] => return Err(KeyError::Empty),
            [b'"', rest @ ..] => parse_sf_string(rest)?,
            token => {
                if !token.iter().all(|b| is_tchar(*b)) {
                    return Err(KeyError::Malformed);
                }
                // Every tchar is ASCII, so this cannot fail; map it anyway rather than unwrap.
                std::str::from_utf8(token)
                    .map_err(|_| KeyError::BadCharacter)?
                    .to_owned()
            }
        };
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        if key.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong);
        }
        Ok(Self(key.into_boxed_str()))
    }

    /// The key's characters (quotes and escapes removed).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Keys are client input and may be sensitive; `Debug` shows only their length.
impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey(<{} bytes>)", self.0.len())
    }
}

/// Parses the rest of an sf-string after its opening quote (RFC 8941 §4.2.5).
fn parse_sf_string(rest: &[u8]) -> Result<String, KeyError> {
    let mut out = String::with_capacity(rest.len());
    let mut bytes = rest.iter().copied();
    loop {
        match bytes.next() {
            None => return Err(KeyError::Malformed),
            Some(b'"') => break,
            Some(b'\\') => match bytes.next() {
                Some(escaped @ (b'"' | b'\\')) => out.push(char::from(escaped)),
                _ => return Err(KeyError::Malformed),
            },
            Some(byte) => out.push(char::from(byte)),
        }
        if out.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong);
        }
    }
    if bytes.next().is_some() {
        // Something after the closing quote, e.g. `"a", "b"` or `"a"b`.
        return Err(KeyError::Malformed);
    }
    Ok(out)
}

fn is_visible_ascii(byte: u8) -> bool {
    (0x21..=0x7e).contains(&byte)
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<String, KeyError> {
        IdempotencyKey::parse_bytes(raw).map(|k| k.as_str().to_owned())
    }

    #[test]
    fn bare_and_quoted_forms_are_the_same_key() {
        let uuid = "8e03978e-40d5-43e8-bc93-6894a57f9324";
        assert_eq!(parse(uuid.as_bytes()).as_deref(), Ok(uuid));
        assert_eq!(parse(format!("\"{uuid}\"").as_bytes()).as_deref(), Ok(uuid));
        assert_eq!(parse(b"  abc  ").as_deref(), Ok("abc"));
        assert_eq!(
            parse(b"1abc").as_deref(),
            Ok("1abc"),
            "any first tchar is fine"
        );
        assert_eq!(
            parse(b"a!#$%&'*+-.^_`|~z").as_deref(),
            Ok("a!#$%&'*+-.^_`|~z")
        );
    }

    #[test]
    fn sf_string_escapes_and_spaces() {
        assert_eq!(parse(br#""a \"b\" \\c""#).as_deref(), Ok(r#"a "b" \c"#));
        assert_eq!(parse(br#""with space""#).as_deref(), Ok("with space"));
        assert_eq!(
            parse(br#""\n""#),
            Err(KeyError::Malformed),
            "only \\\" and \\\\ escape"
        );
        assert_eq!(parse(br#""unterminated"#), Err(KeyError::Malformed));
        assert_eq!(parse(br#""a" "b""#), Err(KeyError::Malformed));
        assert_eq!(parse(br#""a"b"#), Err(KeyError::Malformed));
        assert_eq!(parse(br#""a\"#), Err(KeyError::Malformed));
    }

    #[test]
    fn empty_forms() {
        assert_eq!(parse(b""), Err(KeyError::Empty));
        assert_eq!(parse(b"   "), Err(KeyError::Empty));
        assert_eq!(parse(b"\"\""), Err(KeyError::Empty));
    }

    #[test]
    fn length_bounds() {
        let max = "k".repeat(MAX_KEY_LEN);
        assert_eq!(parse(max.as_bytes()).as_deref(), Ok(max.as_str()));
        assert_eq!(
            parse(format!("\"{max}\"").as_bytes()).as_deref(),
            Ok(max.as_str())
        );
        let over = "k".repeat(MAX_KEY_LEN + 1);
        assert_eq!(parse(over.as_bytes()), Err(KeyError::TooLong));
        assert_eq!(
            parse(format!("\"{over}\"").as_bytes()),
            Err(KeyError::TooLong)
        );
        let huge = "k".repeat(1 << 16);
        assert_eq!(
            parse(format!("\"{huge}\"").as_bytes()),
            Err(KeyError::TooLong)
        );
    }

    #[test]
    fn characters_outside_the_grammar() {
        assert_eq!(parse(b"a\tb"), Err(KeyError::BadCharacter));
        assert_eq!(parse(b"a\x7fb"), Err(KeyError::BadCharacter));
        assert_eq!(parse(b"\"a\x01\""), Err(KeyError::BadCharacter));
        assert_eq!(parse("caf\u{e9}".as_bytes()), Err(KeyError::BadCharacter));
        assert_eq!(parse(b"a b"), Err(KeyError::Malformed));
        assert_eq!(parse(b"a,b"), Err(KeyError::Malformed));
        assert_eq!(parse(b"a, b"), Err(KeyError::Malformed));
        assert_eq!(parse(b"{tag}"), Err(KeyError::Malformed));
        assert_eq!(parse(b"a:b"), Err(KeyError::Malformed));
        assert_eq!(parse(b"?=1"), Err(KeyError::Malformed));
    }

    #[test]
    fn repeated_header_is_rejected() {
        let mut headers = HeaderMap::new();
        assert_eq!(IdempotencyKey::from_headers(&headers), Ok(None));
        headers.append(&IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        assert!(IdempotencyKey::from_headers(&headers).is_ok());
        headers.append(&IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        assert_eq!(
            IdempotencyKey::from_headers(&headers),
            Err(KeyError::Repeated)
        );
    }

    #[test]
    fn debug_hides_the_key() {
        let key = IdempotencyKey::parse_bytes(b"secret-key").unwrap();
        assert_eq!(format!("{key:?}"), "IdempotencyKey(<10 bytes>)");
    }
}
