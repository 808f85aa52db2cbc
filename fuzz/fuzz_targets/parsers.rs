//! One libFuzzer binary for every target of `farm::fuzz::targets`, chosen by
//! `FARM_FUZZ_TARGET` (`scripts/fuzz.sh` runs each in turn): the same parsers the seeded
//! mutation fuzzer of `tests/fuzz.rs` runs, here guided by coverage.

#![no_main]

use std::sync::OnceLock;

static RUN: OnceLock<fn(&[u8])> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let run = RUN.get_or_init(|| {
        let name = std::env::var("FARM_FUZZ_TARGET").unwrap_or_default();
        farm::fuzz::targets()
            .into_iter()
            .find(|target| target.name == name)
            .unwrap_or_else(|| panic!("FARM_FUZZ_TARGET `{name}` names no target of farm::fuzz"))
            .run
    });
    run(data);
});
