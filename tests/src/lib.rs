//! Test-only package: the behaviour, UI and expansion tests live in `tests/`; this library holds
//! what they share.

pub mod instances;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod redis;

pub mod support;
