//! `topoproxy plan`: the table one Node would program from a directory of YAML, as
//! `ipvsadm -Ln` text or JSON, with the planner's reasons on request. Conflicts are logged
//! as the agent logs them.

use std::path::{Path, PathBuf};

use crate::planner::{self, explain, PlanConfig};
use crate::render;
use crate::source::file::{self, FileSourceError};

/// How `plan` prints the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanFormat {
    Ipvsadm,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanOutputError {
    #[error("loading the cluster from {}", dir.display())]
    Load {
        dir: PathBuf,
        #[source]
        source: FileSourceError,
    },
    #[error("node {node:?} is not in {} (nodes there: {})", dir.display(), known_nodes(known))]
    UnknownNode {
        node: String,
        dir: PathBuf,
        known: Vec<String>,
    },
    #[error("encoding the table as JSON")]
    Json(#[source] serde_json::Error),
}

impl PlanOutputError {
    /// The user named something that is not there (exit code 2), rather than a failure.
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::UnknownNode { .. })
    }
}

fn known_nodes(known: &[String]) -> String {
    if known.is_empty() {
        "none".to_owned()
    } else {
        known.join(", ")
    }
}

/// The text `plan` prints for `node_name` from the YAML in `dir`.
pub fn plan_output(
    dir: &Path,
    node_name: &str,
    format: PlanFormat,
    with_explanation: bool,
    config: &PlanConfig,
) -> Result<String, PlanOutputError> {
    let loaded = file::load_dir(dir).map_err(|source| PlanOutputError::Load {
        dir: dir.to_owned(),
        source,
    })?;
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    let Some(node) = loaded.store.node(node_name) else {
        return Err(PlanOutputError::UnknownNode {
            node: node_name.to_owned(),
            dir: dir.to_owned(),
            known: loaded.store.nodes().map(|n| n.name.clone()).collect(),
        });
    };
    let table = planner::plan(&loaded.store, node, config);
    for conflict in table.conflicts() {
        crate::sync::warn_conflict(&conflict);
    }
    let explanation = with_explanation.then(|| {
        let mut explanation = explain::explain(&loaded.store, node, config);
        explain::mark_conflicts(&mut explanation, &table.conflicts());
        explanation
    });
    match format {
        PlanFormat::Ipvsadm => {
            let mut text = render::ipvsadm::render_table(&table);
            if let Some(explanation) = &explanation {
                text.push('\n');
                text.push_str(&explain::render_text(explanation, node));
            }
            Ok(text)
        }
        PlanFormat::Json => {
            let mut json = render::json::render_table(&table, &node.name, explanation.as_deref())
                .map_err(PlanOutputError::Json)?;
            json.push('\n');
            Ok(json)
        }
    }
}
