//! The four transitions and the operator's three as Lua scripts, the record layout they share with
//! the Rust side, and the parsing of their replies.
//!
//! Each script is assembled once from three parts: a prelude of constants generated here from
//! [`layout`] and [`reply`] (so that a byte offset or a reply tag is written once, in Rust),
//! `lua/common.lua` (the helpers every script uses), and the script's own file in `lua/`.
//! Every script is atomic (Redis runs one script at a time), reads the clock with `TIME` (the
//! server's clock, the same for every instance) when it compares or sets a lease, and is safe to
//! run twice with the same owner. `KEYS[1]` is the record.

use std::fmt::Write as _;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::{Script, Value};

use crate::fingerprint::Fingerprint;
use crate::record::{DecodeError, RecordedResult};
use crate::store::{
    Acquired, LeaseDeadline, LeaseSnapshot, OwnerToken, Purged, RecordSnapshot, RecordState,
    StoreError,
};

/// Where each field of a record's value lives. Ranges are of bytes, 0-based and half-open, as Rust
/// slices them; the Lua prelude gets them 1-based and inclusive, as `string.sub` takes them.
pub(super) mod layout {
    use std::ops::Range;

    /// The state letter.
    pub(in crate::store::redis) const STATE: usize = 0;
    /// The request's fingerprint, raw.
    pub(in crate::store::redis) const FINGERPRINT: Range<usize> = 1..33;
    /// The owner token, raw.
    pub(in crate::store::redis) const OWNER: Range<usize> = 33..49;
    /// The epoch, [`DIGITS`] decimal digits.
    pub(in crate::store::redis) const EPOCH: Range<usize> = 49..65;
    /// The lease deadline on the server's clock, [`DIGITS`] decimal digits (zeros once completed).
    pub(in crate::store::redis) const LEASE: Range<usize> = 65..81;
    /// The length of the fixed header; a completed record's encoded result follows it.
    pub(in crate::store::redis) const HEADER_LEN: usize = LEASE.end;
    /// The width of a number field.
    pub(in crate::store::redis) const DIGITS: usize = 16;

    /// In flight: an owner holds the lease.
    pub(in crate::store::redis) const IN_FLIGHT: u8 = b'i';
    /// Released: in flight, the lease ended; the next acquire takes over.
    pub(in crate::store::redis) const RELEASED: u8 = b'r';
    /// Completed: the result follows the header.
    pub(in crate::store::redis) const COMPLETED: u8 = b'c';
}

/// The first element of an acquire's, an inspection's or a purge's reply.
mod reply {
    /// `{INVALID, reason}`: the key does not hold a valid record.
    pub(super) const INVALID: i64 = 0;
    /// `{EXECUTE, epoch}`.
    pub(super) const EXECUTE: i64 = 1;
    /// `{COMPLETED, record, pttl}`.
    pub(super) const COMPLETED: i64 = 2;
    /// `{MISMATCH}`.
    pub(super) const MISMATCH: i64 = 3;
    /// `{IN_FLIGHT, lease_left}` from acquire; `{IN_FLIGHT}` from a purge that left the record.
    pub(super) const IN_FLIGHT: i64 = 4;
    /// `{RECORD, record, pttl, now}`: an inspection found a record.
    pub(super) const RECORD: i64 = 5;
    /// `{ABSENT}`: an inspection or a purge found no record.
    pub(super) const ABSENT: i64 = 6;
    /// `{PURGED}`: a purge deleted the record.
    pub(super) const PURGED: i64 = 7;
}

/// The scripts: the four transitions, then the operator's three.
pub(super) struct Scripts {
    pub(super) acquire: Script,
    pub(super) renew: Script,
    pub(super) complete: Script,
    pub(super) release: Script,
    pub(super) inspect: Script,
    pub(super) purge: Script,
    pub(super) release_stale: Script,
}

impl Scripts {
    /// The scripts a request runs, loaded when the store connects. The operator's three are
    /// loaded on their first use (one `NOSCRIPT` round trip then), so that start-up does not pay
    /// for what is rarely run.
    pub(super) fn for_requests(&self) -> [&Script; 4] {
        [&self.acquire, &self.renew, &self.complete, &self.release]
    }
}

/// Each script's own file, in the order of [`Scripts`]' fields.
const SOURCES: [&str; 7] = [
    include_str!("lua/acquire.lua"),
    include_str!("lua/renew.lua"),
    include_str!("lua/complete.lua"),
    include_str!("lua/release.lua"),
    include_str!("lua/inspect.lua"),
    include_str!("lua/purge.lua"),
    include_str!("lua/release_stale.lua"),
];

pub(super) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| {
    let prelude = prelude();
    let [
        acquire,
        renew,
        complete,
        release,
        inspect,
        purge,
        release_stale,
    ] = SOURCES.map(|own| Script::new(&[prelude.as_str(), COMMON, own].concat()));
    Scripts {
        acquire,
        renew,
        complete,
        release,
        inspect,
        purge,
        release_stale,
    }
});

const COMMON: &str = include_str!("lua/common.lua");

/// The constants every script starts with, from [`layout`] and [`reply`].
fn prelude() -> String {
    use layout::{COMPLETED, DIGITS, EPOCH, FINGERPRINT, HEADER_LEN, IN_FLIGHT, LEASE, OWNER};
    use layout::{RELEASED, STATE};

    let mut lua = String::from("-- Generated by scripts.rs from the record layout.\n");
    let mut constant = |name: &str, value: &dyn std::fmt::Display| {
        // Writing to a String cannot fail.
        let _ = writeln!(lua, "local {name} = {value}");
    };
    constant("HEADER_LEN", &HEADER_LEN);
    constant("STATE", &(STATE + 1));
    for (name, range) in [
        ("FINGERPRINT", FINGERPRINT),
        ("OWNER", OWNER),
        ("EPOCH", EPOCH),
        ("LEASE", LEASE),
    ] {
        constant(&format!("{name}_FIRST"), &(range.start + 1));
        constant(&format!("{name}_LAST"), &range.end);
    }
    constant("NUMBER_FORMAT", &format!("'%0{DIGITS}d'"));
    for (name, letter) in [
        ("IN_FLIGHT", IN_FLIGHT),
        ("RELEASED", RELEASED),
        ("COMPLETED", COMPLETED),
    ] {
        constant(name, &format!("'{}'", char::from(letter)));
    }
    constant("INVALID", &reply::INVALID);
    constant("EXECUTE", &reply::EXECUTE);
    constant("COMPLETED_REPLY", &reply::COMPLETED);
    constant("MISMATCH", &reply::MISMATCH);
    constant("IN_FLIGHT_REPLY", &reply::IN_FLIGHT);
    constant("RECORD", &reply::RECORD);
    constant("ABSENT", &reply::ABSENT);
    constant("PURGED", &reply::PURGED);
    lua
}

fn corrupt(reason: &'static str) -> StoreError {
    StoreError::Corrupt(DecodeError::new(reason))
}

fn duration_ms(ms: i64) -> Duration {
    // A negative PTTL means the key has no expiry (an operator persisted it): report none left, so
    // no cache keeps it.
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// The acquire script's reply.
pub(super) fn parse_acquired(reply: Value) -> Result<Acquired, StoreError> {
    let Value::Array(items) = reply else {
        return Err(corrupt("unexpected script reply"));
    };
    match items.as_slice() {
        [Value::Int(reply::EXECUTE), Value::Int(epoch)] => match u64::try_from(*epoch) {
            Ok(epoch) if epoch >= 1 => Ok(Acquired::Execute { epoch }),
            _ => Err(corrupt("invalid epoch")),
        },
        [
            Value::Int(reply::COMPLETED),
            Value::BulkString(record),
            Value::Int(ttl),
        ] => {
            let result = record
                .get(layout::HEADER_LEN..)
                .ok_or_else(|| corrupt("completed record without a result"))?;
            Ok(Acquired::Completed {
                result: Arc::new(RecordedResult::decode(result)?),
                ttl_left: duration_ms(*ttl),
            })
        }
        [Value::Int(reply::MISMATCH)] => Ok(Acquired::Mismatch),
        [Value::Int(reply::IN_FLIGHT), Value::Int(left)] => Ok(Acquired::InFlight {
            lease_left: duration_ms(*left),
        }),
        [Value::Int(reply::INVALID), Value::BulkString(reason)] => {
            Err(corrupt(match reason.as_slice() {
                b"not a record" => "the record key holds another type or a truncated value",
                b"unknown state" => "record in an unknown state",
                _ => "malformed in-flight record",
            }))
        }
        _ => Err(corrupt("unexpected script reply")),
    }
}

/// The inspect script's reply.
pub(super) fn parse_snapshot(reply: Value) -> Result<Option<RecordSnapshot>, StoreError> {
    let Value::Array(items) = reply else {
        return Err(corrupt("unexpected script reply"));
    };
    let (record, pttl, now) = match items.as_slice() {
        [Value::Int(reply::ABSENT)] => return Ok(None),
        [
            Value::Int(reply::RECORD),
            Value::BulkString(record),
            Value::Int(pttl),
            Value::Int(now),
        ] => (record, *pttl, *now),
        [Value::Int(reply::INVALID), Value::BulkString(_)] => {
            return Err(corrupt(
                "the record key holds another type or a truncated value",
            ));
        }
        _ => return Err(corrupt("unexpected script reply")),
    };
    let field = |range: std::ops::Range<usize>| {
        record
            .get(range)
            .ok_or_else(|| corrupt("truncated record header"))
    };
    let mut fingerprint = [0; 32];
    fingerprint.copy_from_slice(field(layout::FINGERPRINT)?);
    let mut owner = [0; 16];
    owner.copy_from_slice(field(layout::OWNER)?);
    let epoch = digits(field(layout::EPOCH)?).ok_or_else(|| corrupt("invalid epoch"))?;
    let lease_until = digits(field(layout::LEASE)?).ok_or_else(|| corrupt("invalid lease"))?;
    let state = match record.get(layout::STATE) {
        Some(&layout::IN_FLIGHT) => {
            let left = lease_until.saturating_sub(u64::try_from(now).unwrap_or(0));
            let lease = LeaseSnapshot::new(LeaseDeadline(lease_until), Duration::from_millis(left));
            RecordState::InFlight { lease }
        }
        Some(&layout::RELEASED) => RecordState::Released,
        Some(&layout::COMPLETED) => {
            let result = field(layout::HEADER_LEN..record.len())?;
            RecordState::Completed {
                result: Arc::new(RecordedResult::decode(result)?),
            }
        }
        _ => return Err(corrupt("record in an unknown state")),
    };
    let snapshot = RecordSnapshot::new(state, Fingerprint(fingerprint), epoch)
        .with_owner(OwnerToken(u128::from_be_bytes(owner)));
    // A negative PTTL: the key has no expiry (an operator persisted it).
    Ok(Some(match u64::try_from(pttl) {
        Ok(ms) => snapshot.with_ttl_left(Duration::from_millis(ms)),
        Err(_) => snapshot,
    }))
}

/// A number field of the header: exactly [`layout::DIGITS`] decimal digits.
fn digits(field: &[u8]) -> Option<u64> {
    if field.len() != layout::DIGITS || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(field).ok()?.parse().ok()
}

/// The purge script's reply.
pub(super) fn parse_purged(reply: &Value) -> Result<Purged, StoreError> {
    let Value::Array(items) = reply else {
        return Err(corrupt("unexpected script reply"));
    };
    match items.as_slice() {
        [Value::Int(reply::PURGED)] => Ok(Purged::Deleted),
        [Value::Int(reply::ABSENT)] => Ok(Purged::Absent),
        [Value::Int(reply::IN_FLIGHT)] => Ok(Purged::InFlight),
        _ => Err(corrupt("unexpected script reply")),
    }
}

/// The reply of renew, complete, release and `release_stale`: 1 done, 0 not the owner (or, for
/// `release_stale`, not the inspected lease).
pub(super) fn parse_flag(reply: &Value) -> Result<bool, StoreError> {
    match reply {
        Value::Int(1) => Ok(true),
        Value::Int(0) => Ok(false),
        _ => Err(corrupt("unexpected script reply")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prelude_names_the_layout_in_lua_terms() {
        let lua = prelude();
        for line in [
            "local HEADER_LEN = 81",
            "local STATE = 1",
            "local FINGERPRINT_FIRST = 2",
            "local FINGERPRINT_LAST = 33",
            "local OWNER_FIRST = 34",
            "local EPOCH_LAST = 65",
            "local LEASE_FIRST = 66",
            "local NUMBER_FORMAT = '%016d'",
            "local COMPLETED = 'c'",
            "local IN_FLIGHT_REPLY = 4",
            "local ABSENT = 6",
        ] {
            assert!(lua.lines().any(|l| l == line), "missing `{line}` in\n{lua}");
        }
        // The fields tile the header without gaps.
        assert_eq!(layout::FINGERPRINT.start, layout::STATE + 1);
        assert_eq!(layout::OWNER.start, layout::FINGERPRINT.end);
        assert_eq!(layout::EPOCH.start, layout::OWNER.end);
        assert_eq!(layout::LEASE.start, layout::EPOCH.end);
        assert_eq!(layout::EPOCH.len(), layout::DIGITS);
        assert_eq!(layout::LEASE.len(), layout::DIGITS);
    }

    #[test]
    fn every_script_uses_only_names_it_defines() {
        // A typo in a constant's name would make Lua read a nil global at run time.
        for script in SOURCES.into_iter().chain([COMMON]) {
            let defined = [prelude().as_str(), COMMON, script].concat();
            for word in script
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.len() > 2 && w.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
                .filter(|w| {
                    !matches!(
                        *w,
                        "KEYS"
                            | "ARGV"
                            | "GET"
                            | "SET"
                            | "DEL"
                            | "PTTL"
                            | "TIME"
                            | "KEEPTTL"
                            | "PX"
                    )
                })
            {
                assert!(
                    defined.contains(&format!("local {word} =")),
                    "`{word}` is not defined"
                );
            }
        }
    }

    /// A header as the scripts write it.
    fn header(state: u8, epoch: u64, lease_until: u64) -> Vec<u8> {
        let mut record = vec![state];
        record.extend_from_slice(&[7; 32]);
        record.extend_from_slice(&OwnerToken(9).to_bytes());
        record.extend_from_slice(format!("{epoch:016}{lease_until:016}").as_bytes());
        record
    }

    #[test]
    fn inspections_are_parsed_defensively() {
        let reply = |record: Vec<u8>, pttl: i64, now: i64| {
            Value::Array(vec![
                Value::Int(5),
                Value::BulkString(record),
                Value::Int(pttl),
                Value::Int(now),
            ])
        };
        let snapshot = parse_snapshot(reply(header(b'i', 3, 10_500), 60_000, 10_000))
            .unwrap()
            .unwrap();
        assert_eq!(snapshot.epoch, 3);
        assert_eq!(snapshot.owner, Some(OwnerToken(9)));
        assert_eq!(snapshot.fingerprint, Fingerprint([7; 32]));
        assert_eq!(snapshot.ttl_left, Some(Duration::from_mins(1)));
        assert_eq!(
            snapshot.lease(),
            Some(&LeaseSnapshot::new(
                LeaseDeadline(10_500),
                Duration::from_millis(500)
            ))
        );
        // A lease that ran out has no time left; a key without expiry has no ttl.
        let expired = parse_snapshot(reply(header(b'i', 1, 9_000), -1, 10_000))
            .unwrap()
            .unwrap();
        assert_eq!(
            expired.lease().map(|lease| lease.left),
            Some(Duration::ZERO)
        );
        assert_eq!(expired.ttl_left, None);
        let released = parse_snapshot(reply(header(b'r', 2, 9_000), 5, 10_000))
            .unwrap()
            .unwrap();
        assert!(matches!(released.state, RecordState::Released));
        let mut completed = header(b'c', 2, 0);
        completed.extend_from_slice(&RecordedResult::TooLarge.encode());
        let completed = parse_snapshot(reply(completed, 5, 10_000))
            .unwrap()
            .unwrap();
        assert_eq!(
            completed.result().map(|result| &**result),
            Some(&RecordedResult::TooLarge)
        );
        assert!(
            parse_snapshot(Value::Array(vec![Value::Int(6)]))
                .unwrap()
                .is_none()
        );
        let mut bad_epoch = header(b'i', 1, 1);
        bad_epoch[layout::EPOCH.start] = b'x';
        for reply in [
            Value::Nil,
            Value::Array(vec![
                Value::Int(0),
                Value::BulkString(b"not a record".to_vec()),
            ]),
            reply(header(b'x', 1, 1), 5, 1),
            reply(header(b'i', 1, 1)[..40].to_vec(), 5, 1),
            reply(bad_epoch, 5, 1),
            reply(header(b'c', 1, 0), 5, 1),
        ] {
            assert!(
                matches!(parse_snapshot(reply.clone()), Err(StoreError::Corrupt(_))),
                "{reply:?}"
            );
        }
    }

    #[test]
    fn replies_are_parsed_defensively() {
        let bulk = |b: &[u8]| Value::BulkString(b.to_vec());
        assert!(matches!(
            parse_acquired(Value::Array(vec![Value::Int(1), Value::Int(3)])),
            Ok(Acquired::Execute { epoch: 3 })
        ));
        let stored = RecordedResult::TooLarge;
        let record = [&[b'c'; layout::HEADER_LEN][..], &stored.encode()].concat();
        let completed = Value::Array(vec![Value::Int(2), bulk(&record), Value::Int(-1)]);
        match parse_acquired(completed) {
            Ok(Acquired::Completed { result, ttl_left }) => {
                assert_eq!(*result, stored);
                assert_eq!(ttl_left, Duration::ZERO);
            }
            other => panic!("{other:?}"),
        }
        for reply in [
            Value::Nil,
            Value::Int(1),
            Value::Array(vec![]),
            Value::Array(vec![Value::Int(1), Value::Int(0)]),
            Value::Array(vec![Value::Int(1), Value::Int(-4)]),
            Value::Array(vec![Value::Int(2), bulk(b"garbage"), Value::Int(10)]),
            Value::Array(vec![
                Value::Int(2),
                bulk(&[b'c'; layout::HEADER_LEN + 3]),
                Value::Int(10),
            ]),
            Value::Array(vec![Value::Int(0), bulk(b"not a record")]),
            Value::Array(vec![Value::Int(9)]),
        ] {
            assert!(
                matches!(parse_acquired(reply.clone()), Err(StoreError::Corrupt(_))),
                "{reply:?}"
            );
        }
        assert!(matches!(
            parse_purged(&Value::Array(vec![Value::Int(7)])),
            Ok(Purged::Deleted)
        ));
        assert!(matches!(
            parse_purged(&Value::Array(vec![Value::Int(4)])),
            Ok(Purged::InFlight)
        ));
        assert!(parse_purged(&Value::Int(1)).is_err());
        assert!(parse_flag(&Value::Int(1)).unwrap());
        assert!(!parse_flag(&Value::Int(0)).unwrap());
        assert!(parse_flag(&Value::Nil).is_err());
    }
}
