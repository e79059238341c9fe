//! Test-only package: see `tests/`.

pub mod support;
