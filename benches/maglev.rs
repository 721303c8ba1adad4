//! Maglev tables of the eBPF dataplane (`sh`/`mh` services, `dataplane::ebpf::maglev`).
//!
//! First prints what removing one backend does to the clients of a tier of N = 3, 10, 100
//! backends (every backend removed in turn, clients spread uniformly over the table's
//! entries): the share that moves, against the ideal 1/N (only the removed backend's), and the
//! share of the other backends' clients that moves anyway (ideal 0). Then times building one
//! table, which the agent does for each changed tier of such a service at every apply.
//!
//! Run with `cargo bench -p topoproxy --bench maglev --profile release`; figures in
//! docs/topology.md ("Consistent hashing in eBPF").

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use topoproxy::dataplane::ebpf::maglev::{disruption, sample_backends, table};
use topoproxy_common::MAGLEV_SIZE;

fn print_disruption() {
    println!("Maglev table of {MAGLEV_SIZE} entries; one backend of N removed, every one in turn:");
    println!("|   N | entries per backend | moved (ideal 1/N) | mean moved | worst moved | others' clients moved, mean | worst |");
    println!("|---|---|---|---|---|---|---|");
    for n in [3, 10, 100] {
        let backends = sample_backends(n);
        let measured: Vec<_> = (0..n)
            .filter_map(|removed| disruption(&backends, removed))
            .collect();
        let count = measured.len() as f64;
        let mean = |f: fn(&topoproxy::dataplane::ebpf::maglev::Disruption) -> f64| {
            measured.iter().map(f).sum::<f64>() / count
        };
        let worst = |f: fn(&topoproxy::dataplane::ebpf::maglev::Disruption) -> f64| {
            measured.iter().map(f).fold(0.0, f64::max)
        };
        let (low, high) = measured
            .first()
            .map_or((0, 0), |d| (d.entries_min, d.entries_max));
        println!(
            "| {n:>3} | {low}–{high} | {:.2}% | {:.2}% | {:.2}% | {:.2}% | {:.2}% |",
            100.0 / n as f64,
            100.0 * mean(|d| d.moved),
            100.0 * worst(|d| d.moved),
            100.0 * mean(|d| d.moved_needlessly),
            100.0 * worst(|d| d.moved_needlessly),
        );
    }
}

fn bench(c: &mut Criterion) {
    print_disruption();
    let mut group = c.benchmark_group("maglev_table");
    for n in [3, 10, 100] {
        let backends = sample_backends(n);
        group.bench_function(format!("{n}_backends"), |b| {
            b.iter(|| table(black_box(&backends)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
