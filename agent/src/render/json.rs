//! The node table as JSON: every virtual server with its tiers, what is programmed now, and
//! whether the Service is falling back out of its topology preference.

use serde::Serialize;

use crate::planner::explain::ServiceExplanation;
use crate::table::{Backend, Conflict, NodeTable, TierKind, VirtualServer};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonTable<'a> {
    node: &'a str,
    virtual_servers: Vec<JsonVirtualServer<'a>>,
    conflicts: Vec<Conflict>,
    #[serde(skip_serializing_if = "Option::is_none")]
    explain: Option<&'a [ServiceExplanation]>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonVirtualServer<'a> {
    #[serde(flatten)]
    server: &'a VirtualServer,
    active_tier: Option<TierKind>,
    programmed: Vec<&'a Backend>,
    falling_back: bool,
}

/// Pretty-printed JSON of `table` for `node`, with the explanation when one is given.
pub fn render_table(
    table: &NodeTable,
    node: &str,
    explain: Option<&[ServiceExplanation]>,
) -> Result<String, serde_json::Error> {
    let document = JsonTable {
        node,
        virtual_servers: table
            .servers()
            .map(|server| JsonVirtualServer {
                server,
                active_tier: server.active_tier(),
                programmed: server.programmed(),
                falling_back: server.is_falling_back(),
            })
            .collect(),
        conflicts: table.conflicts(),
        explain,
    };
    serde_json::to_string_pretty(&document)
}
