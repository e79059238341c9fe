//! The properties idem's fuzz targets check. Each `check_*` takes arbitrary bytes and panics when a
//! property fails: libFuzzer reports the panic as a crash. The test suite runs the same functions
//! over the committed regression corpus (`fuzz/regression/<target>/`).

use http::Method;
use idem_runtime::fingerprint::Fingerprint;
use idem_runtime::key::{IdempotencyKey, MAX_KEY_LEN};
use idem_runtime::record::RecordedResult;

/// The key parser never panics; what it accepts is 1..=255 printable ASCII bytes, and the quoted
/// form of an accepted key parses back to the same key (as does the bare form, when it is a token).
pub fn check_key(data: &[u8]) {
    let Ok(key) = IdempotencyKey::parse_bytes(data) else {
        return;
    };
    let text = key.as_str();
    assert!(
        (1..=MAX_KEY_LEN).contains(&text.len()),
        "accepted a key of {} bytes",
        text.len()
    );
    assert!(
        text.bytes().all(|b| (0x20..=0x7e).contains(&b)),
        "accepted a non-printable key"
    );

    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        if matches!(c, '"' | '\\') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    let requoted = IdempotencyKey::parse_bytes(quoted.as_bytes());
    assert_eq!(
        requoted.as_ref(),
        Ok(&key),
        "the quoted form of an accepted key must name it"
    );

    if !text.contains([
        ' ', '"', '\\', '(', ')', ',', '/', ':', ';', '<', '=', '>', '?', '@', '[', ']', '{', '}',
    ]) {
        assert_eq!(
            IdempotencyKey::parse_bytes(text.as_bytes()).as_ref(),
            Ok(&key),
            "bare form"
        );
    }
}

/// Fingerprints are deterministic and tell requests apart: the input is cut into method, route,
/// path, query and body, and moving one byte from one field to the next must change the print.
pub fn check_fingerprint(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let methods = [Method::POST, Method::PUT, Method::PATCH, Method::DELETE];
    let method = &methods[usize::from(selector) % methods.len()];
    let fields = split_fields(rest);
    let print = |f: &[&[u8]; 4]| {
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        Fingerprint::of(method, &text(f[0]), &text(f[1]), &text(f[2]), f[3])
    };
    let first = print(&fields);
    assert_eq!(first, print(&fields), "fingerprints must be deterministic");

    // Shift the boundary between two neighbouring fields by one byte, where both stay ASCII (so
    // lossy UTF-8 decoding cannot merge distinct inputs).
    if rest.is_ascii() {
        for i in 0..3 {
            if let Some((&last, head)) = fields[i].split_last() {
                let mut moved = fields;
                moved[i] = head;
                let joined: Vec<u8> = std::iter::once(last)
                    .chain(fields[i + 1].iter().copied())
                    .collect();
                moved[i + 1] = &joined;
                assert_ne!(
                    first,
                    print(&moved),
                    "moving a byte from field {i} to field {} collided",
                    i + 1
                );
            }
        }
    }
}

/// The stored-record decoder treats its input as hostile: it never panics, and whatever it accepts
/// re-encodes to something that decodes to the same result.
pub fn check_record(data: &[u8]) {
    if let Ok(result) = RecordedResult::decode(data) {
        let encoded = result.encode();
        assert_eq!(
            RecordedResult::decode(&encoded).as_ref(),
            Ok(&result),
            "decode ∘ encode must be identity"
        );
    }
}

/// Cuts `bytes` into four fields at the first three NUL bytes (missing fields are empty).
fn split_fields(bytes: &[u8]) -> [&[u8]; 4] {
    let mut fields: [&[u8]; 4] = [&[]; 4];
    let mut rest = bytes;
    for field in fields.iter_mut().take(3) {
        match rest.iter().position(|&b| b == 0) {
            Some(at) => {
                *field = &rest[..at];
                rest = &rest[at + 1..];
            }
            None => {
                *field = rest;
                rest = &[];
            }
        }
    }
    fields[3] = rest;
    fields
}
