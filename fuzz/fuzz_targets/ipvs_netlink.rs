//! A datagram on the IPVS generic-netlink socket, as the kernel's replies arrive.
#![no_main]

libfuzzer_sys::fuzz_target!(|datagram: &[u8]| topoproxy::fuzzing::ipvs_reply(datagram));
