//! A datagram on the ctnetlink socket, as a conntrack dump's replies arrive.
#![no_main]

libfuzzer_sys::fuzz_target!(|datagram: &[u8]| topoproxy::fuzzing::conntrack_datagram(datagram));
