//! Gradual spill between locality tiers: Envoy's priority-level rule, then a capacity guard.
//!
//! **Envoy's rule** (overprovisioning factor 1.4): a tier's health is
//! `min(1, 1.4 × ready / total)`; the healths are normalised by `min(1, Σ health)`, and each
//! tier in fallback order takes `min(what is left, health / normalised)`. A tier stays whole
//! until fewer than 1/1.4 ≈ 71.4 % of its endpoints are ready, then hands over gradually.
//!
//! **The capacity guard** (our refinement, because Envoy's rule knows nothing of capacity): a
//! tier's locality (this node, this zone, this region) holds a fraction of the cluster's Ready
//! endpoints and a fraction of its Nodes, i.e. of its clients when every node sends the same
//! load. If every node of the locality kept more of its traffic inside than
//! `capacity = endpoint fraction / node fraction`, the locality's endpoints would run above the
//! cluster mean. So the share served within the locality — this tier plus the nearer ones — is
//! capped at that ratio, and the excess goes outward. Localities nest, so a nearer tier's cap
//! is also bounded by every outer one. The last tier with Ready endpoints takes whatever is
//! left: something Ready is never left unused while connections would go nowhere.
//!
//! Shares come out in parts per million; cumulative shares are rounded, so the tiers sum to
//! exactly [`SHARE_WHOLE`] whenever any tier has a Ready endpoint.

use serde::Serialize;

use crate::table::SHARE_WHOLE;

/// Envoy's default overprovisioning factor.
pub const OVERPROVISIONING: f64 = 1.4;

/// What the rule knows of one tier.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TierHealth {
    /// Ready endpoints in the tier.
    pub ready: usize,
    /// Every endpoint whose hints or location put it in this tier, ready or not.
    pub total: usize,
    /// At most this fraction of the node's connections may be served within the locality
    /// this tier completes (see the module docs); `None` when no guard applies.
    pub capacity: Option<f64>,
}

impl TierHealth {
    /// `min(1, 1.4 × ready / total)`.
    pub fn health(&self) -> f64 {
        if self.ready == 0 || self.total == 0 {
            return 0.0;
        }
        (OVERPROVISIONING * self.ready as f64 / self.total as f64).min(1.0)
    }
}

/// The share one tier gets, and why.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TierLoad {
    /// Envoy's health of the tier, 0..=1.
    pub health: f64,
    /// Envoy's share for the tier before the capacity guard, 0..=1.
    pub envoy_share: f64,
    /// The cap on the cumulative share through this tier that was in force, if any bound.
    pub capped_at: Option<f64>,
    /// The share of new connections, in parts per million.
    pub share_ppm: u32,
}

/// Splits new connections over `tiers` (in fallback order).
pub fn spill(tiers: &[TierHealth]) -> Vec<TierLoad> {
    let health: Vec<f64> = tiers.iter().map(TierHealth::health).collect();
    let envoy = envoy_shares(&health);
    let Some(last_usable) = tiers.iter().rposition(|tier| tier.ready > 0) else {
        return health
            .iter()
            .zip(&envoy)
            .map(|(&health, &envoy_share)| TierLoad {
                health,
                envoy_share,
                capped_at: None,
                share_ppm: 0,
            })
            .collect();
    };
    // Effective cumulative caps: each tier's own, bounded by every outer usable tier's.
    let mut caps = vec![1.0f64; tiers.len()];
    let mut outer = 1.0f64;
    for index in (0..tiers.len()).rev() {
        if index < last_usable && tiers[index].ready > 0 {
            outer = outer.min(tiers[index].capacity.unwrap_or(1.0).max(0.0));
        }
        caps[index] = outer;
    }
    let mut loads = Vec::with_capacity(tiers.len());
    let mut envoy_cumulative = 0.0f64;
    let mut previous_ppm = 0u32;
    for (index, tier) in tiers.iter().enumerate() {
        envoy_cumulative += envoy[index];
        let share_ppm = if tier.ready == 0 {
            0
        } else {
            let cumulative = if index == last_usable {
                SHARE_WHOLE
            } else {
                to_ppm(envoy_cumulative.min(caps[index]))
            };
            // Rounding of cumulative values keeps them monotone; guard anyway.
            let cumulative = cumulative.max(previous_ppm);
            let share = cumulative - previous_ppm;
            previous_ppm = cumulative;
            share
        };
        loads.push(TierLoad {
            health: health[index],
            envoy_share: envoy[index],
            capped_at: (tier.ready > 0 && index != last_usable && caps[index] < envoy_cumulative)
                .then_some(caps[index]),
            share_ppm,
        });
    }
    loads
}

/// Envoy's priority-level shares for tiers of the given healths (each 0..=1).
pub fn envoy_shares(health: &[f64]) -> Vec<f64> {
    let total: f64 = health.iter().sum();
    if total <= 0.0 {
        return vec![0.0; health.len()];
    }
    let normalized = total.min(1.0);
    let mut left = 1.0f64;
    health
        .iter()
        .map(|&h| {
            let share = (h / normalized).min(left).max(0.0);
            left -= share;
            share
        })
        .collect()
}

fn to_ppm(fraction: f64) -> u32 {
    (fraction.clamp(0.0, 1.0) * f64::from(SHARE_WHOLE)).round() as u32
}

/// How far the share a tier really gets from its integer weights may be from its planned
/// share: 0.1 percentage point.
pub const WEIGHT_TOLERANCE_PPM: u32 = 1_000;

/// The weight scales tried, smallest first: small weights read well in `ipvsadm -Ln`
/// (70/30 over one backend each is 7 and 3), large ones reach any share.
const WEIGHT_SCALES: [u32; 7] = [200, 500, 1_000, 10_000, 100_000, 1_000_000, 10_000_000];

/// Per-backend integer weights for tiers of `sizes` backends taking `shares` (ppm): every
/// backend of a tier gets the same weight, at least 1 when the tier's share is not 0, and the
/// heaviest backend the smallest scale (1, 2, … 100, then [`WEIGHT_SCALES`]) at which every
/// tier's real share is within [`WEIGHT_TOLERANCE_PPM`] of its planned one. A single tier in
/// use therefore comes out as weight 1 everywhere, exactly as kube-proxy programs it.
pub fn backend_weights(shares: &[u32], sizes: &[usize]) -> Vec<u32> {
    let per_backend: Vec<f64> = shares
        .iter()
        .zip(sizes)
        .map(|(&share, &size)| match (share, size) {
            (0, _) | (_, 0) => 0.0,
            (share, size) => f64::from(share) / size as f64,
        })
        .collect();
    let heaviest = per_backend.iter().copied().fold(0.0f64, f64::max);
    if heaviest <= 0.0 {
        return vec![0; shares.len()];
    }
    let weights_at = |scale: u32| -> Vec<u32> {
        per_backend
            .iter()
            .map(|&p| {
                if p <= 0.0 {
                    0
                } else {
                    ((f64::from(scale) * p / heaviest).round() as u32).max(1)
                }
            })
            .collect()
    };
    let close_enough = |weights: &[u32]| -> bool {
        let total: f64 = weights
            .iter()
            .zip(sizes)
            .map(|(&w, &n)| f64::from(w) * n as f64)
            .sum();
        weights
            .iter()
            .zip(sizes)
            .zip(shares)
            .all(|((&w, &n), &share)| {
                let real = f64::from(w) * n as f64 / total * f64::from(SHARE_WHOLE);
                (real - f64::from(share)).abs() <= f64::from(WEIGHT_TOLERANCE_PPM)
            })
    };
    let mut weights = Vec::new();
    for scale in (1..=100).chain(WEIGHT_SCALES) {
        weights = weights_at(scale);
        if close_enough(&weights) {
            break;
        }
    }
    weights
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(ready: usize, total: usize) -> TierHealth {
        TierHealth {
            ready,
            total,
            capacity: None,
        }
    }

    fn percent(loads: &[TierLoad]) -> Vec<u32> {
        loads
            .iter()
            .map(|load| (load.share_ppm + 5_000) / 10_000)
            .collect()
    }

    /// The examples of Envoy's "Priority levels" documentation.
    #[test]
    fn envoy_documented_examples() {
        assert_eq!(percent(&spill(&[tier(72, 100), tier(1, 1)])), [100, 0]);
        assert_eq!(percent(&spill(&[tier(71, 100), tier(1, 1)])), [99, 1]);
        assert_eq!(percent(&spill(&[tier(50, 100), tier(1, 1)])), [70, 30]);
        assert_eq!(percent(&spill(&[tier(25, 100), tier(1, 1)])), [35, 65]);
        // Envoy works in integer percents (35 + 35 + 28 = 98 normalised, documented as
        // 36/36/28); exactly, that is 35.7/35.7/28.6.
        let loads = spill(&[tier(25, 100), tier(25, 100), tier(20, 100)]);
        let shares: Vec<u32> = loads.iter().map(|load| load.share_ppm).collect();
        assert_eq!(shares, [357_143, 357_143, 285_714]);
    }

    #[test]
    fn shares_sum_to_the_whole_and_skip_empty_tiers() {
        let loads = spill(&[tier(0, 3), tier(1, 4), tier(0, 0), tier(2, 2)]);
        assert_eq!(loads.iter().map(|l| l.share_ppm).sum::<u32>(), SHARE_WHOLE);
        assert_eq!(loads[0].share_ppm, 0);
        assert_eq!(loads[2].share_ppm, 0);
        assert!(loads[1].share_ppm > 0 && loads[3].share_ppm > 0);
    }

    #[test]
    fn nothing_ready_means_no_share_anywhere() {
        let loads = spill(&[tier(0, 3), tier(0, 1)]);
        assert!(loads.iter().all(|l| l.share_ppm == 0));
    }

    #[test]
    fn a_lone_unhealthy_tier_still_takes_everything() {
        assert_eq!(percent(&spill(&[tier(1, 10)])), [100]);
        assert_eq!(percent(&spill(&[tier(0, 2), tier(1, 10)])), [0, 100]);
    }

    #[test]
    fn capacity_guard_sends_the_excess_outward() {
        let small_zone = TierHealth {
            ready: 1,
            total: 1,
            capacity: Some(0.25),
        };
        assert_eq!(percent(&spill(&[small_zone, tier(9, 9)])), [25, 75]);
        // An outer guard bounds the inner tier too.
        let node = TierHealth {
            ready: 1,
            total: 1,
            capacity: Some(4.0),
        };
        let loads = spill(&[node, small_zone, tier(9, 9)]);
        assert_eq!(percent(&loads), [25, 0, 75]);
        assert_eq!(loads[0].capped_at, Some(0.25));
    }

    #[test]
    fn the_last_usable_tier_ignores_its_guard() {
        let guarded = TierHealth {
            ready: 1,
            total: 1,
            capacity: Some(0.1),
        };
        assert_eq!(percent(&spill(&[guarded, tier(0, 0)])), [100, 0]);
    }

    #[test]
    fn weights_follow_shares_and_reduce_to_one_for_a_single_tier() {
        assert_eq!(backend_weights(&[SHARE_WHOLE, 0], &[3, 2]), [1, 0]);
        assert_eq!(backend_weights(&[700_000, 300_000], &[2, 2]), [7, 3]);
        assert_eq!(backend_weights(&[666_667, 333_333], &[1, 2]), [4, 1]);
        // A sliver over many backends needs a large scale to stay within 0.1 point.
        assert_eq!(backend_weights(&[999_999, 1], &[1, 100]), [100_000, 1]);
        assert_eq!(backend_weights(&[0, 0], &[1, 1]), [0, 0]);
    }
}
