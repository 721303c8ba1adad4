//! What `topoproxy run` sets on the node once its dataplane is set up, as kube-proxy does at start
//! (its `platformSetup` and `oom_score_adj`): the conntrack sysctls and the agent's own OOM
//! score. Dry-run touches neither.

use anyhow::Context as _;

use topoproxy::config::RunSettings;
use topoproxy::dataplane::conntrack_sysctls;
use topoproxy::dataplane::ipvs::sysctl::Sysctls;

pub fn apply(settings: &RunSettings) -> anyhow::Result<()> {
    if let Some(adj) = settings.oom_score_adj {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .with_context(|| format!("setting oom_score_adj to {adj} (oom-score-adj)"))?;
        tracing::info!(oom_score_adj = adj, "set the agent's OOM score adjustment");
    }
    let written = conntrack_sysctls::apply(
        &settings.conntrack,
        conntrack_sysctls::cpus(),
        &Sysctls::proc(),
        std::path::Path::new(conntrack_sysctls::HASHSIZE_PATH),
    )
    .context("could not set conntrack parameters from the conntrack settings")?;
    if !written.is_empty() {
        tracing::info!(sysctls = ?written, "conntrack sysctls set");
    }
    Ok(())
}
