//! Fuzz target: see `idem_fuzz::check_record`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| idem_fuzz::check_record(data));
