//! The agent's HTTP endpoints as a test reads them: one plain HTTP/1.1 GET (blocking, and
//! the same for async tests) and one parser of the Prometheus text `/metrics` serves.
//! The GET is the control-plane harness's (`k8s_harness::plain_http`), so the tests and the
//! harness share one HTTP client.
//!
//! Include with `#[path = "support/http.rs"] mod http;`. `cluster.rs` carries this file as
//! its child module (`cluster::http`): a target that includes `cluster.rs` reaches it there.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;

/// `GET path` on `address`; the status and the body, or `None` while nothing answers
/// (`k8s_harness::plain_http`, the harness's one HTTP client: connecting waits 2 s, the
/// answer 10 s).
pub fn get(address: SocketAddr, path: &str) -> Option<(u16, String)> {
    k8s_harness::plain_http(address, "GET", path, "")
}

/// The body of `GET path` whatever its status; `None` while nothing answers.
pub fn http_get(address: SocketAddr, path: &str) -> Option<String> {
    get(address, path).map(|(_, body)| body)
}

/// [`get`] for async tests, on tokio's blocking pool so it never stalls the runtime.
pub async fn get_async(address: SocketAddr, path: &str) -> Option<(u16, String)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || get(address, &path))
        .await
        .ok()?
}

/// One sample of a Prometheus text exposition: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of `text`; comments and lines that do not parse are skipped.
pub fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(parse_sample)
        .collect()
}

/// The sum of the samples that `selector` picks, `None` when it picks none. A selector is a
/// metric name, optionally with labels as Prometheus writes them
/// (`topoproxy_syncs_total{result="failure"}`): a sample is picked when its name is the name
/// and it carries every label given (it may carry more).
pub fn metric_sum(text: &str, selector: &str) -> Option<f64> {
    let Some(wanted) = parse_series(selector).filter(|(_, rest)| rest.trim().is_empty()) else {
        panic!("not a metric selector: {selector:?}");
    };
    let ((name, labels), _) = wanted;
    let mut found = None;
    for sample in samples(text) {
        let picked = sample.name == name
            && labels
                .iter()
                .all(|(key, value)| sample.labels.get(key) == Some(value));
        if picked {
            *found.get_or_insert(0.0) += sample.value;
        }
    }
    found
}

/// A series' name and labels, and the rest of the line after them.
type Series<'a> = ((String, BTreeMap<String, String>), &'a str);

fn parse_sample(line: &str) -> Option<Sample> {
    let ((name, labels), rest) = parse_series(line)?;
    // The value, then an optional timestamp.
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

fn parse_series(line: &str) -> Option<Series<'_>> {
    let line = line.trim_start();
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inside) = rest.strip_prefix('{') {
        rest = inside;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after_key) = rest.split_once('=')?;
            let (value, after_value) = quoted(after_key.trim_start())?;
            labels.insert(key.trim().to_owned(), value);
            rest = after_value;
        }
    }
    Some(((name.to_owned(), labels), rest))
}

/// A double-quoted label value with its escapes (`\"`, `\\`, `\n`), and what follows it.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut chars = text.strip_prefix('"')?.char_indices();
    let mut value = String::new();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[i + 2..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

#[cfg(test)]
mod metric_parser_tests {
    use super::*;

    const TEXT: &str = "# HELP topoproxy_syncs_total Syncs.\n\
        # TYPE topoproxy_syncs_total counter\n\
        topoproxy_syncs_total{result=\"success\"} 3\n\
        topoproxy_syncs_total{result=\"failure\"} 1\n\
        topoproxy_backends 12\n\
        topoproxy_backends_falling_back 5\n\
        topoproxy_api_synced{resource=\"services\",kind=\"a \\\"b\\\", c}\"} 1 1700000000000\n";

    #[test]
    fn a_bare_name_sums_every_series_of_that_name_only() {
        assert_eq!(metric_sum(TEXT, "topoproxy_syncs_total"), Some(4.0));
        assert_eq!(metric_sum(TEXT, "topoproxy_backends"), Some(12.0));
        assert_eq!(metric_sum(TEXT, "topoproxy_missing"), None);
    }

    #[test]
    fn labels_pick_the_series_that_carry_them() {
        assert_eq!(
            metric_sum(TEXT, "topoproxy_syncs_total{result=\"failure\"}"),
            Some(1.0)
        );
        assert_eq!(
            metric_sum(TEXT, "topoproxy_syncs_total{result=\"other\"}"),
            None
        );
        assert_eq!(
            metric_sum(TEXT, "topoproxy_api_synced{resource=\"services\"}"),
            Some(1.0)
        );
    }

    #[test]
    fn quoted_label_values_keep_escapes_commas_and_braces() {
        let synced = samples(TEXT)
            .into_iter()
            .find(|s| s.name == "topoproxy_api_synced")
            .expect("the labelled sample with a timestamp");
        assert_eq!(synced.labels["kind"], "a \"b\", c}");
        assert_eq!(synced.value, 1.0);
    }
}
