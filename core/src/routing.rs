//! Routing: which table a record goes to. `--route POINTER=VALUE:TABLE` rules are tried in
//! order and the first that holds wins; a record no rule matches (or whose routing cannot be
//! read: not JSON) goes to the default table: the records table, or for a consumer of several
//! topics, the table of the record's topic. No IO.

use crate::columns::{compile_pointers, Node};
use crate::scan;
use crate::upsert::Matcher;

/// The default table's index.
pub const DEFAULT_TABLE: usize = 0;

/// Rules compiled into one tree, walked once per record.
#[derive(Clone, Debug, Default)]
pub struct Router {
    /// (rule, index of its table).
    rules: Vec<(Matcher, usize)>,
    tree: Node,
    /// Where a record no rule names goes.
    default: usize,
}

impl Router {
    /// Rules in order: the first whose matcher holds names the record's table (an index into
    /// the consumer's tables; [`DEFAULT_TABLE`] when none holds).
    pub fn new(rules: Vec<(Matcher, usize)>) -> Self {
        let tree = compile_pointers(rules.iter().map(|(m, _)| Some(m.pointer())));
        Router {
            rules,
            tree,
            default: DEFAULT_TABLE,
        }
    }

    /// No rules: every record goes to the table at `index`.
    pub fn to(index: usize) -> Self {
        Router {
            default: index,
            ..Router::default()
        }
    }

    /// Whether every record goes to the default table.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The table of the record `json`. `found` is scratch space, reused between records.
    pub fn route<'a>(&self, json: &'a [u8], found: &mut Vec<Option<&'a str>>) -> usize {
        if self.rules.is_empty() {
            return self.default;
        }
        found.clear();
        found.resize(self.rules.len(), None);
        let Ok(text) = std::str::from_utf8(json) else {
            return self.default;
        };
        if scan::scan(text, &self.tree, found).is_err() {
            return self.default;
        }
        self.rules
            .iter()
            .zip(found.iter())
            .find(|((m, _), raw)| m.matches(**raw))
            .map_or(self.default, |((_, table), _)| *table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(rules: &[(&str, usize)]) -> Router {
        Router::new(
            rules
                .iter()
                .map(|(m, t)| (m.parse().unwrap(), *t))
                .collect(),
        )
    }

    #[test]
    fn the_first_rule_that_holds_wins_and_the_rest_go_to_the_default_table() {
        let r = router(&[("/type=click", 1), ("/type=order", 2), ("/kind=click", 3)]);
        let to = |json: &'static str| r.route(json.as_bytes(), &mut vec![]);
        assert_eq!(to(r#"{"type":"click","kind":"click"}"#), 1);
        assert_eq!(to(r#"{"type":"order"}"#), 2);
        assert_eq!(to(r#"{"kind":"click","type":"view"}"#), 3);
        assert_eq!(to(r#"{"type":"view"}"#), DEFAULT_TABLE);
        assert_eq!(to(r#"{"other":1}"#), DEFAULT_TABLE, "no value: no match");
        assert_eq!(to("not json"), DEFAULT_TABLE);
        assert_eq!(to("[1,2]"), DEFAULT_TABLE);
    }

    #[test]
    fn two_rules_may_read_the_same_pointer_and_no_rules_route_nothing() {
        let r = router(&[("/a/b=1", 1), ("/a/b=2", 2)]);
        let mut found = vec![];
        assert_eq!(r.route(br#"{"a":{"b":2}}"#, &mut found), 2);
        assert!(router(&[]).is_empty());
        assert_eq!(router(&[]).route(br#"{"a":1}"#, &mut found), DEFAULT_TABLE);
        assert_eq!(Router::to(2).route(br#"{"a":1}"#, &mut found), 2);
    }
}
