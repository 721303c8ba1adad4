//! IPVS schedulers: the cluster-wide `--ipvs-scheduler` and the per-Service
//! `topoproxy.io/ipvs-scheduler` annotation, with the `sh`/`mh` flags `ipvsadm -b` sets.
//!
//! A [`Scheduler`] is two bytes and `Copy`: every planned virtual server carries one, so a
//! `String` per virtual server (24 bytes plus a heap block) would cost on large tables.
//!
//! Text form: the scheduler's name, then its flags, comma-separated, e.g. `mh`,
//! `mh,mh-port`, `sh,sh-fallback,sh-port` (the names `ipvsadm -b` takes). Flags belong to
//! their scheduler: `sh-port` on `mh` is refused, not ignored.

use std::fmt;

use serde::{Serialize, Serializer};

/// `IP_VS_SVC_F_SCHED1`: `sh-fallback` on `sh`, `mh-fallback` on `mh`.
pub const IP_VS_SVC_F_SCHED1: u32 = 0x8;
/// `IP_VS_SVC_F_SCHED2`: `sh-port` on `sh`, `mh-port` on `mh`.
pub const IP_VS_SVC_F_SCHED2: u32 = 0x10;
/// `IP_VS_SVC_F_SCHED3`: defined by the kernel, used by no scheduler it ships.
pub const IP_VS_SVC_F_SCHED3: u32 = 0x20;
/// Every scheduler flag bit of an IPVS service.
pub const IP_VS_SVC_F_SCHED_MASK: u32 =
    IP_VS_SVC_F_SCHED1 | IP_VS_SVC_F_SCHED2 | IP_VS_SVC_F_SCHED3;

/// The schedulers the kernel ships (`net/netfilter/ipvs/ip_vs_*.c`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SchedulerKind {
    #[default]
    Rr,
    Wrr,
    Lc,
    Wlc,
    Lblc,
    Lblcr,
    Dh,
    Sh,
    Sed,
    Nq,
    Fo,
    Ovf,
    Mh,
    Twos,
    /// A name read back from the kernel that topoproxy does not know (an out-of-tree module,
    /// another tool's service). Never planned, so such a service always differs from its plan.
    Unknown,
}

impl SchedulerKind {
    /// Every scheduler topoproxy plans, by name.
    pub const KNOWN: [Self; 14] = [
        Self::Rr,
        Self::Wrr,
        Self::Lc,
        Self::Wlc,
        Self::Lblc,
        Self::Lblcr,
        Self::Dh,
        Self::Sh,
        Self::Sed,
        Self::Nq,
        Self::Fo,
        Self::Ovf,
        Self::Mh,
        Self::Twos,
    ];

    /// The kernel's name of the scheduler (`IPVS_SVC_ATTR_SCHED_NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Rr => "rr",
            Self::Wrr => "wrr",
            Self::Lc => "lc",
            Self::Wlc => "wlc",
            Self::Lblc => "lblc",
            Self::Lblcr => "lblcr",
            Self::Dh => "dh",
            Self::Sh => "sh",
            Self::Sed => "sed",
            Self::Nq => "nq",
            Self::Fo => "fo",
            Self::Ovf => "ovf",
            Self::Mh => "mh",
            Self::Twos => "twos",
            Self::Unknown => "unknown",
        }
    }

    /// The scheduler called `name`, if topoproxy knows it.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::KNOWN.into_iter().find(|kind| kind.name() == name)
    }

    /// Whether the scheduler takes [`SchedulerFlags`] (`sh` and `mh` do).
    fn takes_flags(self) -> bool {
        matches!(self, Self::Sh | Self::Mh)
    }
}

/// The scheduler flags of `sh` and `mh`, as `IP_VS_SVC_F_SCHED1`/`2` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SchedulerFlags(u8);

impl SchedulerFlags {
    /// No flag.
    pub const NONE: Self = Self(0);
    /// `sh-fallback` / `mh-fallback`: skip a backend whose weight is 0 or that is overloaded.
    pub const FALLBACK: Self = Self(1);
    /// `sh-port` / `mh-port`: hash the source port too, not just the address.
    pub const PORT: Self = Self(2);

    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    #[must_use]
    pub fn with(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The bits of an IPVS service's flags (`IPVS_SVC_ATTR_FLAGS`).
    pub fn kernel_bits(self) -> u32 {
        let mut bits = 0;
        if self.contains(Self::FALLBACK) {
            bits |= IP_VS_SVC_F_SCHED1;
        }
        if self.contains(Self::PORT) {
            bits |= IP_VS_SVC_F_SCHED2;
        }
        bits
    }

    /// The flags among an IPVS service's flag bits (`IP_VS_SVC_F_SCHED3`, which no shipped
    /// scheduler reads, is not kept).
    pub fn from_kernel_bits(bits: u32) -> Self {
        let mut flags = Self::NONE;
        if bits & IP_VS_SVC_F_SCHED1 != 0 {
            flags = flags.with(Self::FALLBACK);
        }
        if bits & IP_VS_SVC_F_SCHED2 != 0 {
            flags = flags.with(Self::PORT);
        }
        flags
    }
}

/// One IPVS scheduler and its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Scheduler {
    pub kind: SchedulerKind,
    pub flags: SchedulerFlags,
}

/// Why a scheduler text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    #[error("is empty")]
    Empty,
    #[error("{0:?} is not an IPVS scheduler (one of {known})", known = known_names())]
    UnknownScheduler(String),
    #[error("flag {flag:?} is not one of {scheduler}'s ({known})", known = flag_names(*.scheduler))]
    UnknownFlag {
        scheduler: SchedulerKind,
        flag: String,
    },
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn known_names() -> String {
    let names: Vec<&str> = SchedulerKind::KNOWN.iter().map(|k| k.name()).collect();
    names.join(", ")
}

fn flag_names(kind: SchedulerKind) -> String {
    if kind.takes_flags() {
        format!("{0}-fallback, {0}-port", kind.name())
    } else {
        "it takes none".to_owned()
    }
}

impl Scheduler {
    /// A scheduler without flags.
    pub const fn new(kind: SchedulerKind) -> Self {
        Self {
            kind,
            flags: SchedulerFlags::NONE,
        }
    }

    /// The kernel's name of the scheduler (`IPVS_SVC_ATTR_SCHED_NAME`), without flags.
    pub fn name(&self) -> &str {
        self.kind.name()
    }

    /// Parses the text form (`mh`, `mh,mh-port`, `sh,sh-fallback,sh-port`); blanks around
    /// items are ignored, a repeated flag counts once.
    pub fn parse(text: &str) -> Result<Self, SchedulerError> {
        let mut items = text.split(',').map(str::trim);
        let name = items.next().unwrap_or_default();
        if name.is_empty() {
            return Err(SchedulerError::Empty);
        }
        let kind = SchedulerKind::from_name(name)
            .ok_or_else(|| SchedulerError::UnknownScheduler(name.to_owned()))?;
        let mut flags = SchedulerFlags::NONE;
        for item in items {
            let flag = item
                .strip_prefix(kind.name())
                .filter(|_| kind.takes_flags())
                .and_then(|suffix| match suffix {
                    "-fallback" => Some(SchedulerFlags::FALLBACK),
                    "-port" => Some(SchedulerFlags::PORT),
                    _ => None,
                })
                .ok_or_else(|| SchedulerError::UnknownFlag {
                    scheduler: kind,
                    flag: item.to_owned(),
                })?;
            flags = flags.with(flag);
        }
        Ok(Self { kind, flags })
    }

    /// The scheduler as the kernel reports a service's: its name and its flag bits.
    /// Flag bits on a scheduler that takes none are kept as they are not what any plan
    /// holds: such a service differs from its plan and is edited.
    pub fn from_kernel(name: &str, flag_bits: u32) -> Self {
        Self {
            kind: SchedulerKind::from_name(name).unwrap_or(SchedulerKind::Unknown),
            flags: SchedulerFlags::from_kernel_bits(flag_bits),
        }
    }

    /// The scheduler to use where backend weights carry locality tiers (`weighted`): `rr`
    /// and `lc` ignore weights, so they become `wrr` and `wlc` (with one tier in use every
    /// weight is 1 and `wrr` schedules exactly as `rr`). The others read weights already
    /// (`sh`, `mh`, `dh` skip weight-0 backends; `mh` sizes its table by them).
    #[must_use]
    pub fn weighted(self, weighted: bool) -> Self {
        let kind = match (weighted, self.kind) {
            (true, SchedulerKind::Rr) => SchedulerKind::Wrr,
            (true, SchedulerKind::Lc) => SchedulerKind::Wlc,
            (_, kind) => kind,
        };
        Self { kind, ..self }
    }

    /// The flags as `ipvsadm -Ln` prints them after the scheduler (`sh-fallback,sh-port`),
    /// or `None` without any.
    pub fn flag_text(&self) -> Option<String> {
        if self.flags.is_empty() {
            return None;
        }
        let prefix = if self.kind.takes_flags() {
            self.kind.name()
        } else {
            "sched"
        };
        let mut names = Vec::new();
        if self.flags.contains(SchedulerFlags::FALLBACK) {
            names.push(format!("{prefix}-fallback"));
        }
        if self.flags.contains(SchedulerFlags::PORT) {
            names.push(format!("{prefix}-port"));
        }
        Some(names.join(","))
    }
}

impl fmt::Display for Scheduler {
    /// The text form [`Scheduler::parse`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        if let Some(flags) = self.flag_text() {
            write!(f, ",{flags}")?;
        }
        Ok(())
    }
}

/// Compares with the text form, so `scheduler == "mh,mh-port"` reads as it says.
impl PartialEq<&str> for Scheduler {
    fn eq(&self, text: &&str) -> bool {
        Scheduler::parse(text).is_ok_and(|parsed| parsed == *self)
    }
}

impl Serialize for Scheduler {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_scheduler_parses_and_prints_back() {
        for kind in SchedulerKind::KNOWN {
            let scheduler = Scheduler::parse(kind.name()).unwrap();
            assert_eq!(scheduler, Scheduler::new(kind));
            assert_eq!(scheduler.to_string(), kind.name());
        }
    }

    #[test]
    fn sh_and_mh_take_their_flags() {
        let mh = Scheduler::parse("mh,mh-port").unwrap();
        assert_eq!(mh.kind, SchedulerKind::Mh);
        assert_eq!(mh.flags, SchedulerFlags::PORT);
        assert_eq!(mh.flags.kernel_bits(), IP_VS_SVC_F_SCHED2);
        let sh = Scheduler::parse(" sh , sh-fallback,sh-port ").unwrap();
        assert_eq!(
            sh.flags.kernel_bits(),
            IP_VS_SVC_F_SCHED1 | IP_VS_SVC_F_SCHED2
        );
        assert_eq!(sh.to_string(), "sh,sh-fallback,sh-port");
        assert_eq!(Scheduler::parse(&sh.to_string()).unwrap(), sh);
        assert_eq!(
            Scheduler::parse("mh,mh-fallback,mh-fallback")
                .unwrap()
                .flags,
            SchedulerFlags::FALLBACK
        );
    }

    #[test]
    fn bad_text_is_refused_with_the_reason() {
        assert_eq!(Scheduler::parse(""), Err(SchedulerError::Empty));
        assert_eq!(Scheduler::parse(" ,mh-port"), Err(SchedulerError::Empty));
        let unknown = Scheduler::parse("maglev").unwrap_err();
        assert_eq!(unknown, SchedulerError::UnknownScheduler("maglev".into()));
        assert!(unknown.to_string().contains("one of rr, wrr,"), "{unknown}");
        // Flags belong to their scheduler; rr takes none; case matters as in the kernel.
        for (text, flag) in [
            ("mh,sh-port", "sh-port"),
            ("rr,rr-port", "rr-port"),
            ("sh,", ""),
            ("mh,mh-ports", "mh-ports"),
        ] {
            match Scheduler::parse(text) {
                Err(SchedulerError::UnknownFlag { flag: got, .. }) => assert_eq!(got, flag),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            Scheduler::parse("MH"),
            Err(SchedulerError::UnknownScheduler(_))
        ));
        let message = Scheduler::parse("rr,rr-port").unwrap_err().to_string();
        assert_eq!(
            message,
            "flag \"rr-port\" is not one of rr's (it takes none)"
        );
    }

    #[test]
    fn kernel_answers_read_back_including_unknown_names_and_stray_bits() {
        let mh = Scheduler::from_kernel("mh", IP_VS_SVC_F_SCHED1 | 0x2);
        assert_eq!(mh, Scheduler::parse("mh,mh-fallback").unwrap());
        let odd = Scheduler::from_kernel("foo", 0);
        assert_eq!(odd.kind, SchedulerKind::Unknown);
        assert_ne!(odd, Scheduler::default());
        // Flags on rr: kept, so the service differs from a plain rr plan and is repaired.
        assert_ne!(
            Scheduler::from_kernel("rr", IP_VS_SVC_F_SCHED2),
            Scheduler::new(SchedulerKind::Rr)
        );
    }

    #[test]
    fn weights_replace_only_weight_blind_schedulers_and_keep_flags() {
        let parse = |text| Scheduler::parse(text).unwrap();
        assert_eq!(parse("rr").weighted(true), parse("wrr"));
        assert_eq!(parse("lc").weighted(true), parse("wlc"));
        assert_eq!(parse("rr").weighted(false), parse("rr"));
        for kept in ["sh,sh-port", "mh,mh-fallback", "dh", "wlc", "sed", "twos"] {
            assert_eq!(parse(kept).weighted(true), parse(kept), "{kept}");
        }
    }

    #[test]
    fn a_scheduler_is_two_bytes() {
        assert_eq!(std::mem::size_of::<Scheduler>(), 2);
    }
}
