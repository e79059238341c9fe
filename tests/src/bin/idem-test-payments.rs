//! The payments example's program, built inside this package so that its tests get it from cargo
//! (`CARGO_BIN_EXE_idem-test-payments`, compiled with the same features as the tests) instead of
//! building `idem-examples`' binary a second time. The same code as the `payments` binary:
//! [`idem_examples::serve::main`].

fn main() -> std::process::ExitCode {
    idem_examples::serve::main()
}
