//! Runs the fuzz targets' properties over the committed regression corpus (`fuzz/regression/`), so
//! every input that once found a bug, and a seed of each input class, is checked by `cargo test`.
//!
//! The checks are the very functions the fuzz targets call (`idem_fuzz::check_*`). So that this
//! test can fail, it also asserts that each corpus reaches both sides of its property (inputs the
//! parser accepts, whose round trip is then checked, and inputs it rejects), and that the harness
//! reports a failing property instead of swallowing it.

use std::path::PathBuf;

use idem_runtime::key::IdempotencyKey;
use idem_runtime::record::RecordedResult;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regression")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .map(|path| {
            let bytes = std::fs::read(&path)
                .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
            (path, bytes)
        })
        .collect();
    inputs.sort();
    assert!(
        inputs.len() >= 5,
        "the {target} corpus has only {} inputs",
        inputs.len()
    );
    inputs
}

/// Feeds every input of `target`'s corpus to `check`; fails naming each input whose property
/// fails. Returns the inputs, for the coverage assertions.
fn run(target: &str, check: fn(&[u8])) -> Vec<(PathBuf, Vec<u8>)> {
    let inputs = corpus(target);
    let failures: Vec<_> = inputs
        .iter()
        .filter(|(_, input)| std::panic::catch_unwind(|| check(input)).is_err())
        .map(|(path, _)| path.display().to_string())
        .collect();
    assert!(
        failures.is_empty(),
        "inputs failing the {target} property: {failures:?}"
    );
    inputs
}

/// Asserts that `accepted` holds for at least `min` inputs and fails for at least `min` others,
/// so both sides of the property are exercised.
#[track_caller]
fn assert_both_sides(
    target: &str,
    inputs: &[(PathBuf, Vec<u8>)],
    min: usize,
    accepted: impl Fn(&[u8]) -> bool,
) {
    let yes = inputs.iter().filter(|(_, input)| accepted(input)).count();
    let no = inputs.len() - yes;
    assert!(
        yes >= min && no >= min,
        "the {target} corpus must hold at least {min} accepted and {min} rejected inputs \
         (has {yes} and {no}); regenerate the accepted ones if the format changed"
    );
}

#[test]
fn key_corpus() {
    let inputs = run("key", idem_fuzz::check_key);
    assert_both_sides("key", &inputs, 5, |input| {
        IdempotencyKey::parse_bytes(input).is_ok()
    });
}

#[test]
fn fingerprint_corpus() {
    let inputs = run("fingerprint", idem_fuzz::check_fingerprint);
    // The collision check runs on ASCII inputs whose fields are non-empty: make sure some are.
    assert_both_sides("fingerprint", &inputs, 2, |input| {
        input.len() > 1
            && input[1..].is_ascii()
            && input[1..]
                .split(|&b| b == 0)
                .filter(|f| !f.is_empty())
                .count()
                >= 4
    });
}

#[test]
fn record_corpus() {
    let inputs = run("record", idem_fuzz::check_record);
    assert_both_sides("record", &inputs, 3, |input| {
        RecordedResult::decode(input).is_ok()
    });
}

/// The harness itself: a property that fails on some input must fail the run.
#[test]
#[should_panic(expected = "inputs failing the key property")]
fn a_failing_property_fails_the_run() {
    run("key", |input| assert!(input.len() > 3, "short input"));
}
