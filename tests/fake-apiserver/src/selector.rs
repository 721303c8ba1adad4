//! Label and field selectors, parsed the way the Kubernetes API server parses the
//! `labelSelector` and `fieldSelector` query parameters.
//!
//! Label selector grammar (terms joined by commas, commas inside `(...)` belong to the set):
//! `key`, `!key`, `key=value`, `key==value`, `key!=value`, `key in (a,b)`, `key notin (a,b)`,
//! and the numeric `key>N` / `key<N`. An empty selector matches everything.
//!
//! Field selectors support `metadata.name` and `metadata.namespace` with `=`, `==` and `!=`.

use std::collections::BTreeMap;

/// A selector string that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SelectorError(String);

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelTerm {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Gt(String, i64),
    Lt(String, i64),
}

impl LabelTerm {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            LabelTerm::Exists(k) => labels.contains_key(k),
            LabelTerm::NotExists(k) => !labels.contains_key(k),
            LabelTerm::Eq(k, v) => labels.get(k) == Some(v),
            // `!=` matches objects without the label too (as in Kubernetes).
            LabelTerm::NotEq(k, v) => labels.get(k) != Some(v),
            LabelTerm::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            LabelTerm::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            LabelTerm::Gt(k, n) => labels
                .get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v > *n),
            LabelTerm::Lt(k, n) => labels
                .get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v < *n),
        }
    }
}

/// A parsed label selector: every term must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    terms: Vec<LabelTerm>,
}

impl LabelSelector {
    /// Parses a `labelSelector` query value.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut terms = Vec::new();
        for raw in split_top_level(s)? {
            let term = raw.trim();
            if term.is_empty() {
                if s.trim().is_empty() {
                    continue;
                }
                return Err(SelectorError(format!(
                    "unable to parse requirement: empty term in {s:?}"
                )));
            }
            terms.push(parse_label_term(term)?);
        }
        Ok(Self { terms })
    }

    /// Whether `labels` satisfy every term.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|t| t.matches(labels))
    }

    /// Whether this selector matches everything.
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Result<Vec<&str>, SelectorError> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| SelectorError(format!("unbalanced ')' in selector {s:?}")))?;
            }
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(SelectorError(format!("unbalanced '(' in selector {s:?}")));
    }
    out.push(&s[start..]);
    Ok(out)
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 317
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
        && k.matches('/').count() <= 1
        && !k.starts_with('/')
        && !k.ends_with('/')
}

fn valid_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn key(k: &str, term: &str) -> Result<String, SelectorError> {
    let k = k.trim();
    if valid_key(k) {
        Ok(k.to_string())
    } else {
        Err(SelectorError(format!(
            "unable to parse requirement: invalid label key {k:?} in {term:?}"
        )))
    }
}

fn value(v: &str, term: &str) -> Result<String, SelectorError> {
    let v = v.trim();
    if valid_value(v) {
        Ok(v.to_string())
    } else {
        Err(SelectorError(format!(
            "unable to parse requirement: invalid label value {v:?} in {term:?}"
        )))
    }
}

fn parse_label_term(term: &str) -> Result<LabelTerm, SelectorError> {
    if let Some(rest) = term.strip_prefix('!') {
        return Ok(LabelTerm::NotExists(key(rest, term)?));
    }
    if let Some(open) = term.find('(') {
        let close = term
            .rfind(')')
            .filter(|c| *c > open && term[*c + 1..].trim().is_empty())
            .ok_or_else(|| SelectorError(format!("unable to parse requirement {term:?}")))?;
        let head: Vec<&str> = term[..open].split_whitespace().collect();
        let [k, op] = head.as_slice() else {
            return Err(SelectorError(format!(
                "unable to parse requirement {term:?}: expected `key in (...)` or `key notin (...)`"
            )));
        };
        let k = key(k, term)?;
        let values = term[open + 1..close]
            .split(',')
            .map(|v| value(v, term))
            .collect::<Result<Vec<_>, _>>()?;
        return match *op {
            "in" => Ok(LabelTerm::In(k, values)),
            "notin" => Ok(LabelTerm::NotIn(k, values)),
            other => Err(SelectorError(format!(
                "unable to parse requirement {term:?}: unknown operator {other:?}"
            ))),
        };
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(LabelTerm::NotEq(key(k, term)?, value(v, term)?));
    }
    if let Some((k, v)) = term.split_once("==") {
        return Ok(LabelTerm::Eq(key(k, term)?, value(v, term)?));
    }
    if let Some((k, v)) = term.split_once('=') {
        return Ok(LabelTerm::Eq(key(k, term)?, value(v, term)?));
    }
    for (op, gt) in [('>', true), ('<', false)] {
        if let Some((k, v)) = term.split_once(op) {
            let n: i64 = v.trim().parse().map_err(|_| {
                SelectorError(format!(
                    "unable to parse requirement {term:?}: {v:?} is not an integer"
                ))
            })?;
            let k = key(k, term)?;
            return Ok(if gt {
                LabelTerm::Gt(k, n)
            } else {
                LabelTerm::Lt(k, n)
            });
        }
    }
    Ok(LabelTerm::Exists(key(term, term)?))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Name,
    Namespace,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldTerm {
    field: Field,
    value: String,
    negate: bool,
}

/// A parsed field selector over `metadata.name` / `metadata.namespace`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    terms: Vec<FieldTerm>,
}

impl FieldSelector {
    /// Parses a `fieldSelector` query value.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut terms = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self { terms });
        }
        for raw in s.split(',') {
            let term = raw.trim();
            let (f, v, negate) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, false)
            } else {
                return Err(SelectorError(format!(
                    "invalid selector: '{s}'; can't understand '{term}'"
                )));
            };
            let field = match f.trim() {
                "metadata.name" => Field::Name,
                "metadata.namespace" => Field::Namespace,
                other => return Err(SelectorError(format!("field label not supported: {other}"))),
            };
            terms.push(FieldTerm {
                field,
                value: v.trim().to_string(),
                negate,
            });
        }
        Ok(Self { terms })
    }

    /// Whether an object with this namespace and name satisfies every term.
    pub fn matches(&self, namespace: &str, name: &str) -> bool {
        self.terms.iter().all(|t| {
            let actual = match t.field {
                Field::Name => name,
                Field::Namespace => namespace,
            };
            (actual == t.value) != t.negate
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_terms() {
        let l = labels(&[("kubernetes.io/service-name", "svc-1"), ("tier", "web")]);
        let ok = |s: &str| LabelSelector::parse(s).expect(s).matches(&l);
        assert!(ok(""));
        assert!(ok("kubernetes.io/service-name"));
        assert!(ok("!service.kubernetes.io/headless"));
        assert!(!ok("!tier"));
        assert!(ok("tier=web"));
        assert!(ok("tier==web"));
        assert!(!ok("tier!=web"));
        assert!(ok("absent!=web"));
        assert!(ok("tier in (web, db)"));
        assert!(!ok("tier notin (web,db)"));
        assert!(ok("absent notin (web)"));
        assert!(ok(
            "kubernetes.io/service-name,!service.kubernetes.io/headless,tier in (a,web)"
        ));
        assert!(!ok("kubernetes.io/service-name,tier=db"));
    }

    #[test]
    fn label_errors() {
        for bad in [
            "a in (b",
            "a)",
            "=b",
            "a,,b",
            "a foo (b)",
            "bad key",
            "a=b c",
            "a>x",
        ] {
            assert!(
                LabelSelector::parse(bad).is_err(),
                "{bad:?} should not parse"
            );
        }
        // `a=` has an empty value, which is valid in Kubernetes.
        assert!(LabelSelector::parse("a=").is_ok());
    }

    #[test]
    fn field_terms() {
        let f = FieldSelector::parse("metadata.name=node-a-0").expect("parse");
        assert!(f.matches("", "node-a-0"));
        assert!(!f.matches("", "node-a-1"));
        let f = FieldSelector::parse("metadata.namespace!=kube-system,metadata.name==x")
            .expect("parse");
        assert!(f.matches("default", "x"));
        assert!(!f.matches("kube-system", "x"));
        assert!(FieldSelector::parse("spec.clusterIP=1.2.3.4").is_err());
        assert!(FieldSelector::parse("metadata.name").is_err());
    }
}
