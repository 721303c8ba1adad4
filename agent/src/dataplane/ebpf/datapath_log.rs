//! Datapath diagnostics: the records the programs emit with aya-log (off until switched on in
//! the pinned `TP_LOG_CONFIG`, capped per CPU), read from their ring buffer and re-emitted as
//! the agent's own `tracing` events with the Service they concern.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use aya_log::EbpfLogger;
use topoproxy_common::log_events;

use crate::dataplane::ServiceNames;
use crate::table::VsKey;

/// Which events to log and how many records each CPU may emit per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatapathLog {
    /// `topoproxy_common::log_events` bits.
    pub events: u32,
    pub per_second: u32,
}

impl DatapathLog {
    /// Nothing logged: the default.
    pub const OFF: Self = Self {
        events: 0,
        per_second: 0,
    };
}

/// The event names accepted by `topoproxy datapath-log --events`, with their bits.
pub const EVENT_NAMES: [(&str, u32); 6] = [
    ("no-backend", log_events::NO_BACKEND),
    ("tier-fallback", log_events::TIER_FALLBACK),
    ("slot-miss", log_events::SLOT_MISS),
    ("reply-ambiguous", log_events::REPLY_AMBIGUOUS),
    ("etp-local-drop", log_events::ETP_LOCAL_DROP),
    ("snat-exhausted", log_events::SNAT_EXHAUSTED),
];

/// Parses `all`, `none` or a comma-separated list of [`EVENT_NAMES`].
pub fn parse_events(text: &str) -> Result<u32, String> {
    match text {
        "all" => return Ok(log_events::ALL),
        "none" => return Ok(0),
        _ => {}
    }
    text.split(',').try_fold(0, |bits, name| {
        EVENT_NAMES
            .iter()
            .find(|(known, _)| *known == name.trim())
            .map(|(_, bit)| bits | bit)
            .ok_or_else(|| format!("unknown datapath event {name:?}"))
    })
}

/// One record as the programs format it: `<event> svc=<id>[ tier=<n>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathEvent {
    pub event: String,
    pub service_id: u32,
    pub tier: Option<u32>,
}

/// Parses a record's message; `None` for one not in the programs' format.
pub fn parse_event(message: &str) -> Option<DatapathEvent> {
    let mut words = message.split_whitespace();
    let event = words.next()?.to_owned();
    let mut service_id = None;
    let mut tier = None;
    for word in words {
        match word.split_once('=') {
            Some(("svc", id)) => service_id = id.parse().ok(),
            Some(("tier", n)) => tier = n.parse().ok(),
            _ => {}
        }
    }
    Some(DatapathEvent {
        event,
        service_id: service_id?,
        tier,
    })
}

/// Service id → virtual service, kept current by the dataplane after every change.
pub(crate) type ServiceIds = Arc<RwLock<HashMap<u32, VsKey>>>;

/// Turns aya-log records into `tracing` events naming the Service.
struct Sink {
    ids: ServiceIds,
    names: ServiceNames,
}

impl Sink {
    fn emit(&self, level: log::Level, message: &str) {
        let Some(event) = parse_event(message) else {
            tracing::warn!(target: "topoproxy::datapath", message, "datapath record");
            return;
        };
        let key = self
            .ids
            .read()
            .ok()
            .and_then(|ids| ids.get(&event.service_id).copied());
        let service = key
            .as_ref()
            .and_then(|key| (self.names)(key))
            .unwrap_or_else(|| "-".to_owned());
        let vip = key.map_or_else(
            || "-".to_owned(),
            |key| {
                format!(
                    "{:?} {}",
                    key.protocol,
                    SocketAddr::new(key.address, key.port)
                )
            },
        );
        let tier = event.tier.map_or_else(|| "-".to_owned(), |t| t.to_string());
        let event = event.event.as_str();
        match level {
            log::Level::Error => {
                tracing::error!(target: "topoproxy::datapath", event, %service, %vip, %tier, "datapath event")
            }
            log::Level::Warn => {
                tracing::warn!(target: "topoproxy::datapath", event, %service, %vip, %tier, "datapath event")
            }
            _ => {
                tracing::info!(target: "topoproxy::datapath", event, %service, %vip, %tier, "datapath event")
            }
        }
    }
}

impl log::Log for Sink {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        self.emit(record.level(), &record.args().to_string());
    }

    fn flush(&self) {}
}

/// The thread reading the programs' log ring buffer; stops when dropped.
pub(crate) struct LogReader {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LogReader {
    /// Reads the ring buffer of the programs loaded with `program_id` (all of ours share one).
    pub fn start(
        program_id: u32,
        ids: ServiceIds,
        names: ServiceNames,
    ) -> Result<Self, aya_log::Error> {
        let mut logger = EbpfLogger::init_from_id_with_logger(program_id, Sink { ids, names })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("datapath-log".to_owned())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    let mut poll = libc::pollfd {
                        fd: logger.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // Wakes on records, and every 200 ms to notice a stop.
                    // SAFETY: poll reads and writes the one pollfd we own.
                    unsafe { libc::poll(&mut poll, 1, 200) };
                    logger.flush();
                }
            })
            .ok();
        Ok(Self { stop, thread })
    }
}

impl Drop for LogReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_in_the_programs_format_parse_and_others_do_not() {
        assert_eq!(
            parse_event("tier_fallback svc=7 tier=2"),
            Some(DatapathEvent {
                event: "tier_fallback".to_owned(),
                service_id: 7,
                tier: Some(2),
            })
        );
        assert_eq!(
            parse_event("no_backend svc=0").map(|e| (e.service_id, e.tier)),
            Some((0, None))
        );
        assert_eq!(parse_event("no_backend"), None);
        assert_eq!(parse_event(""), None);
    }

    #[test]
    fn event_lists_parse_by_name_and_reject_unknown_names() {
        assert_eq!(parse_events("all"), Ok(log_events::ALL));
        assert_eq!(parse_events("none"), Ok(0));
        assert_eq!(
            parse_events("no-backend,tier-fallback"),
            Ok(log_events::NO_BACKEND | log_events::TIER_FALLBACK)
        );
        assert!(parse_events("no-backend,bogus").is_err());
    }
}
