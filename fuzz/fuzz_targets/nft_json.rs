//! The JSON of `nft -j list table inet topoproxy`, which the agent reads back at start.
#![no_main]

libfuzzer_sys::fuzz_target!(|json: &str| topoproxy::fuzzing::nft_table(json));
