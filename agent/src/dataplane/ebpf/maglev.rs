//! Maglev lookup tables (Eisenbud et al., NSDI 2016, §3.4) for the services whose IPVS
//! scheduler is `sh` or `mh`: the eBPF programs take `table[client_hash % MAGLEV_SIZE]` as the
//! backend of a new connection, so a client keeps its backend while other backends come and
//! go.
//!
//! Each backend has a permutation of the table's entries (`offset + j * skip mod M`, both
//! from a hash of its address and port; `M` is prime, so every `skip` walks all of them);
//! backends take turns claiming the next free entry of their permutation until the table is
//! full. Every backend ends with `⌊M/N⌋` or `⌈M/N⌉` entries. The fill runs over the backends
//! sorted by address and port, so the table depends only on the set, not on the slot order
//! (the values are slot indices: they follow the slots).
//!
//! What Maglev guarantees on a removal is less than a perfect consistent hash: every entry of
//! the removed backend moves (to the others, evenly), and a few entries of the remaining
//! backends move too, because the turn order of the fill changes. [`disruption`] measures both;
//! `docs/topology.md` has the figures.

use std::net::IpAddr;

use topoproxy_common::{mix32, MAGLEV_SIZE};

/// An empty entry during the fill.
const EMPTY: u16 = u16::MAX;

/// A backend's permutation of the table: it tries `offset`, `offset + skip`, … (mod M).
#[derive(Debug, Clone, Copy)]
struct Permutation {
    offset: usize,
    skip: usize,
}

impl Permutation {
    fn of(address: IpAddr, port: u16) -> Self {
        let words: [u32; 4] = match address {
            IpAddr::V4(v4) => [u32::from(v4), 0, 0, 0],
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                [
                    (bits >> 96) as u32,
                    (bits >> 64) as u32,
                    (bits >> 32) as u32,
                    bits as u32,
                ]
            }
        };
        let name = topoproxy_common::client_hash(&words, u32::from(port));
        let offset = mix32(name ^ 0x2545_f491) as usize % MAGLEV_SIZE;
        let skip = mix32(name ^ 0x9e6c_63d0) as usize % (MAGLEV_SIZE - 1) + 1;
        Self { offset, skip }
    }

    fn entry(&self, turn: usize) -> usize {
        (self.offset + turn * self.skip) % MAGLEV_SIZE
    }
}

/// The Maglev table of one tier whose backends are `backends` in slot order: each entry is a
/// slot index. `None` for an empty tier, or one with more backends than entries (the programs
/// then choose at random in it).
pub fn table(backends: &[(IpAddr, u16)]) -> Option<Box<[u16; MAGLEV_SIZE]>> {
    if backends.is_empty() || backends.len() > MAGLEV_SIZE {
        return None;
    }
    // The fill order is by identity, so the same set gives the same table in any slot order.
    let mut order: Vec<u16> = (0..backends.len() as u16).collect();
    order.sort_by_key(|&index| backends[usize::from(index)]);
    let permutations: Vec<Permutation> = order
        .iter()
        .map(|&index| {
            let (address, port) = backends[usize::from(index)];
            Permutation::of(address, port)
        })
        .collect();
    let mut turns = vec![0usize; order.len()];
    let mut entries = Box::new([EMPTY; MAGLEV_SIZE]);
    let mut filled = 0;
    loop {
        for (rank, permutation) in permutations.iter().enumerate() {
            // A permutation visits every entry once within M turns, and a free one remains
            // while `filled < M`: this ends.
            let mut entry = permutation.entry(turns[rank]);
            while entries[entry] != EMPTY {
                turns[rank] += 1;
                entry = permutation.entry(turns[rank]);
            }
            entries[entry] = order[rank];
            turns[rank] += 1;
            filled += 1;
            if filled == MAGLEV_SIZE {
                return Some(entries);
            }
        }
    }
}

/// What removing one backend does to the clients of a table of `backends` backends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Disruption {
    pub backends: usize,
    /// Share of the clients whose backend changed (ideal: the removed backend's, `1/N`).
    pub moved: f64,
    /// Share of the clients that were not on the removed backend and moved anyway (ideal: 0).
    pub moved_needlessly: f64,
    /// The fewest and most entries a backend holds before the removal (balance).
    pub entries_min: usize,
    pub entries_max: usize,
}

/// Removes backend `removed` of `backends` (slot order, as the agent does: the last backend
/// moves into the hole) and compares, client by client, the backend before and after, over
/// the table's entries (clients hash uniformly onto them).
pub fn disruption(backends: &[(IpAddr, u16)], removed: usize) -> Option<Disruption> {
    let before = table(backends)?;
    let mut after_slots = backends.to_vec();
    after_slots.swap_remove(removed);
    let after = table(&after_slots)?;
    let mut counts = vec![0usize; backends.len()];
    let (mut moved, mut needless) = (0usize, 0usize);
    for (old, new) in before.iter().zip(after.iter()) {
        counts[usize::from(*old)] += 1;
        let old_backend = backends[usize::from(*old)];
        let new_backend = after_slots[usize::from(*new)];
        if old_backend != new_backend {
            moved += 1;
            if usize::from(*old) != removed {
                needless += 1;
            }
        }
    }
    Some(Disruption {
        backends: backends.len(),
        moved: moved as f64 / MAGLEV_SIZE as f64,
        moved_needlessly: needless as f64 / MAGLEV_SIZE as f64,
        entries_min: counts.iter().copied().min().unwrap_or(0),
        entries_max: counts.iter().copied().max().unwrap_or(0),
    })
}

/// `n` backends at 10.244.x.y:8080, for measurements and tests.
pub fn sample_backends(n: usize) -> Vec<(IpAddr, u16)> {
    (0..n)
        .map(|i| {
            let address = std::net::Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250 + 1) as u8);
            (IpAddr::V4(address), 8080)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_backend_holds_its_floor_or_ceiling_share_of_entries() {
        for n in [1, 2, 3, 10, 100, MAGLEV_SIZE] {
            let backends = sample_backends(n);
            let Some(table) = table(&backends) else {
                panic!("no table for {n} backends");
            };
            let mut counts = vec![0usize; n];
            for &index in table.iter() {
                counts[usize::from(index)] += 1;
            }
            let (floor, ceiling) = (MAGLEV_SIZE / n, MAGLEV_SIZE.div_ceil(n));
            assert!(
                counts.iter().all(|&c| c == floor || c == ceiling),
                "{n} backends: {counts:?}"
            );
        }
    }

    #[test]
    fn the_table_depends_on_the_set_not_the_slot_order() {
        let backends = sample_backends(10);
        let mut shuffled = backends.clone();
        shuffled.reverse();
        shuffled.swap(2, 7);
        let (Some(a), Some(b)) = (table(&backends), table(&shuffled)) else {
            panic!("no table");
        };
        for (x, y) in a.iter().zip(b.iter()) {
            assert_eq!(backends[usize::from(*x)], shuffled[usize::from(*y)]);
        }
    }

    #[test]
    fn no_table_for_an_empty_or_oversized_tier() {
        assert!(table(&[]).is_none());
        assert!(table(&sample_backends(MAGLEV_SIZE + 1)).is_none());
    }

    /// Maglev's guarantee on a removal: every client of the removed backend moves (to the
    /// others), and a share of the others' clients moves too, growing with `N/M` (the fill's
    /// turn order shifts). Measured over every backend removed in turn; the bounds are a
    /// little above the measured worst (`docs/topology.md`: 0.49%, 3.04%, 4.90%).
    #[test]
    fn a_removal_moves_the_removed_backends_clients_and_few_others() {
        for (n, bound) in [(3, 0.01), (10, 0.04), (100, 0.06)] {
            let backends = sample_backends(n);
            let mut worst_needless: f64 = 0.0;
            for removed in 0..n {
                let Some(d) = disruption(&backends, removed) else {
                    panic!("no table for {n} backends");
                };
                let removed_share = d.moved - d.moved_needlessly;
                // All of the removed backend's entries moved: its share is ⌊M/N⌋ or ⌈M/N⌉.
                let removed_entries = (removed_share * MAGLEV_SIZE as f64).round() as usize;
                assert!(
                    removed_entries == MAGLEV_SIZE / n
                        || removed_entries == MAGLEV_SIZE.div_ceil(n),
                    "{n} backends, removed {removed}: {removed_entries} of its entries moved"
                );
                worst_needless = worst_needless.max(d.moved_needlessly);
            }
            assert!(
                worst_needless <= bound,
                "{n} backends: up to {worst_needless:.4} of the clients moved needlessly"
            );
        }
    }
}
