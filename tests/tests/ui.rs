//! UI tests: misuses of `#[idempotent]` fail with the intended error on the intended token
//! (`ui/fail`), and accepted forms compile and route (`ui/pass`).
//!
//! The `.stderr` files depend on the compiler's exact output, hence the pinned toolchain. A normal run
//! never rewrites them: a mismatch fails. Regenerate with `TRYBUILD=overwrite` and review the diff.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("ui/pass/*.rs");
    cases.compile_fail("ui/fail/*.rs");
}
