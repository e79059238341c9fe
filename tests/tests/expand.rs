//! Expansion snapshots: `expand/*.rs` expanded by cargo-expand against the committed
//! `*.expanded.rs`.
//!
//! The inputs use no other macros, so a snapshot changes only when `#[idempotent]`'s expansion does.
//! A normal run never writes snapshots: a missing or different one fails. Regenerate with
//! `MACROTEST=overwrite` (cargo-expand pinned to the version in CI) and review the diff.

#[test]
fn expand() {
    if std::env::var_os("MACROTEST").is_some_and(|value| value == "overwrite") {
        macrotest::expand("expand/*.rs");
    } else {
        macrotest::expand_without_refresh("expand/*.rs");
    }
}
