//! Which ownership records a read may forget, decided without touching the kernel.
//!
//! A record (an element of the nft table's sets) whose IPVS service is gone is forgotten: an
//! agent killed between recording and creating a service, or between deleting it and clearing
//! its record, leaves one, and kept it would claim whatever service another tool later creates
//! at that address and port. But the IPVS service dump is no proof of absence: on Linux 6.1 and
//! 6.12 each part of a multipart dump resumes at a position that counts every network
//! namespace's services, so services deleted in another namespace during our dump make it skip
//! some of ours, and IPVS never sets `NLM_F_DUMP_INTR` to say so. A record forgotten on such a
//! read is lost for good if the plan deletes its service in the same window: the agent no
//! longer owns the service, so it never deletes it.
//!
//! So a record is forgotten only when two reads agree that its service is gone. The dataplane
//! asks for every recorded service the dump did not list by its key: a GET, which the kernel
//! answers by lookup, not by position, so its answer settles the question at once (a service it
//! finds is read in as if listed; one it does not is gone, as a restart after a crash between
//! deleting a service and clearing its record needs to see). Without an answer (the GET failed)
//! the record is kept, and forgotten only if the next read's dump misses the service too.

use std::collections::{BTreeMap, BTreeSet};

use crate::table::VsKey;

/// What the kernel answered a GET of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The kernel has the service: the dump skipped it.
    Present,
    /// The kernel does not have the service.
    Absent,
}

/// What one read concludes about the records whose services its dump did not list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordVerdict {
    /// Records to forget now.
    pub forget: BTreeSet<VsKey>,
    /// Records whose services this read did not find and that are kept: the next read checks
    /// them again, and forgets them if it does not find them either.
    pub suspects: BTreeSet<VsKey>,
}

/// Judges the `recorded` keys against what this read found: `listed`, the keys the service
/// dump returned; `previous_suspects`, the previous read's [`RecordVerdict::suspects`];
/// `probes`, the GET answers for keys the dump did not list.
///
/// A record whose service the dump missed is forgotten when a GET says the service is absent,
/// or, without an answer, when the previous read's dump missed it too. One dump alone never
/// forgets a record.
pub fn judge_records(
    recorded: &BTreeSet<VsKey>,
    listed: &BTreeSet<VsKey>,
    previous_suspects: &BTreeSet<VsKey>,
    probes: &BTreeMap<VsKey, Probe>,
) -> RecordVerdict {
    let mut verdict = RecordVerdict::default();
    for key in recorded.difference(listed) {
        match probes.get(key) {
            Some(Probe::Present) => {}
            Some(Probe::Absent) => {
                verdict.forget.insert(*key);
            }
            None if previous_suspects.contains(key) => {
                verdict.forget.insert(*key);
            }
            None => {
                verdict.suspects.insert(*key);
            }
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn key(port: u16) -> VsKey {
        VsKey::new(Protocol::Tcp, "10.96.0.10".parse().expect("address"), port)
    }

    fn keys(ports: &[u16]) -> BTreeSet<VsKey> {
        ports.iter().map(|&port| key(port)).collect()
    }

    fn probes(answers: &[(u16, Probe)]) -> BTreeMap<VsKey, Probe> {
        answers
            .iter()
            .map(|&(port, probe)| (key(port), probe))
            .collect()
    }

    /// The single-read case: a dump that skipped a service (another namespace deleted services
    /// meanwhile) must not cost its record when nothing else confirms the service is gone.
    #[test]
    fn a_service_missing_from_one_dump_keeps_its_record() {
        let recorded = keys(&[80, 443, 53]);
        let listed = keys(&[80, 53]);
        let verdict = judge_records(&recorded, &listed, &BTreeSet::new(), &BTreeMap::new());
        assert_eq!(
            verdict,
            RecordVerdict {
                forget: BTreeSet::new(),
                suspects: keys(&[443]),
            }
        );
    }

    #[test]
    fn a_service_the_dump_skipped_and_a_get_finds_keeps_its_record() {
        let recorded = keys(&[80, 443]);
        let listed = keys(&[80]);
        for previous in [BTreeSet::new(), keys(&[443])] {
            let verdict = judge_records(
                &recorded,
                &listed,
                &previous,
                &probes(&[(443, Probe::Present)]),
            );
            assert_eq!(verdict, RecordVerdict::default(), "{previous:?}");
        }
    }

    /// The dump and the GET are two reads that agree; a restart after a crash between deleting
    /// a service and clearing its record forgets the record at its first read.
    #[test]
    fn a_service_the_dump_missed_and_a_get_does_not_find_loses_its_record() {
        let recorded = keys(&[80, 443]);
        let listed = keys(&[80]);
        let verdict = judge_records(
            &recorded,
            &listed,
            &BTreeSet::new(),
            &probes(&[(443, Probe::Absent)]),
        );
        assert_eq!(
            verdict,
            RecordVerdict {
                forget: keys(&[443]),
                suspects: BTreeSet::new(),
            }
        );
    }

    #[test]
    fn without_a_get_two_dumps_in_a_row_must_miss_the_service() {
        let recorded = keys(&[80, 443]);
        let listed = keys(&[80]);
        let verdict = judge_records(&recorded, &listed, &keys(&[443]), &BTreeMap::new());
        assert_eq!(
            verdict,
            RecordVerdict {
                forget: keys(&[443]),
                suspects: BTreeSet::new(),
            }
        );
    }

    #[test]
    fn a_service_listed_again_is_no_longer_suspect() {
        let recorded = keys(&[80, 443]);
        let verdict = judge_records(&recorded, &recorded, &keys(&[443]), &BTreeMap::new());
        assert_eq!(verdict, RecordVerdict::default());
    }

    /// Suspicion is per key and per pair of reads: a different key missing now starts its own
    /// count, and a suspect whose record went meanwhile (the agent deleted its service) is
    /// dropped from the suspects.
    #[test]
    fn suspicion_does_not_carry_over_to_other_keys() {
        let recorded = keys(&[80, 443]);
        let listed = keys(&[443]);
        let verdict = judge_records(&recorded, &listed, &keys(&[443, 8080]), &BTreeMap::new());
        assert_eq!(
            verdict,
            RecordVerdict {
                forget: BTreeSet::new(),
                suspects: keys(&[80]),
            }
        );
    }
}
