//! Runs the fuzz targets' properties over the committed regression corpus (`fuzz/regression/`), so
//! every input that once found a bug, and a seed of each input class, is checked by `cargo test`.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regression")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
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

fn run(target: &str, check: fn(&[u8])) {
    for (path, input) in corpus(target) {
        let outcome = std::panic::catch_unwind(|| check(&input));
        assert!(outcome.is_ok(), "{} fails its property", path.display());
    }
}

#[test]
fn key_corpus() {
    run("key", idem_fuzz::check_key);
}

#[test]
fn fingerprint_corpus() {
    run("fingerprint", idem_fuzz::check_fingerprint);
}

#[test]
fn record_corpus() {
    run("record", idem_fuzz::check_record);
}
