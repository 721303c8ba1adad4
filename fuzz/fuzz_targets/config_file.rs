//! A `topoproxy run --config` file, parsed and resolved.
#![no_main]

libfuzzer_sys::fuzz_target!(|text: &str| topoproxy::fuzzing::config_file(text));
