//! One pass over a record's JSON for typed columns: validates all of it (RFC 8259: every
//! string, escape, number and literal, nesting at any depth without recursion) and captures
//! the raw text of each value a column's pointer names, descending only where a pointer goes.
//!
//! Purpose-built because it runs once per record on the consumer's hot path: it allocates
//! nothing (but for a key with escapes on a mapped path, or nesting deeper than 64 levels),
//! compares keys as bytes, and skips string content eight bytes at a time.

use std::borrow::Cow;

/// A JSON value's place in the record: the pointer tree of a mapping (see
/// [`crate::Mapping`]) as the scanner walks it.
pub(crate) trait PathNode {
    /// Slots (columns) whose pointer ends at this value.
    fn slots(&self) -> &[usize];
    /// Slots whose pointer ends at this value or inside it.
    fn slots_below(&self) -> &[usize];
    /// Whether some pointer goes deeper than this value.
    fn has_children(&self) -> bool;
    /// The node for member `key` of an object here.
    fn member(&self, key: &str) -> Option<&Self>;
    /// The node for element `index` of an array here.
    fn element(&self, index: usize) -> Option<&Self>;
}

/// Validates `text` as one JSON value and sets `found[slot]` to the raw text of every value a
/// slot of `root`'s tree names (`None` where its pointer does not resolve; the last of
/// duplicate keys wins, as in Postgres's jsonb). The error says what is wrong and where.
pub(crate) fn scan<'a, N: PathNode>(
    text: &'a str,
    root: &N,
    found: &mut [Option<&'a str>],
) -> Result<(), String> {
    let mut s = Scanner {
        text,
        b: text.as_bytes(),
        i: 0,
    };
    s.walk(root, found)?;
    s.ws();
    if s.i != s.b.len() {
        return Err(s.err("text after the end of the value"));
    }
    Ok(())
}

struct Scanner<'a> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
}

/// Open containers while skipping a value (true: an object), 64 levels in a word and any
/// deeper ones in a vector that is allocated only then.
#[derive(Default)]
struct Open {
    bits: u64,
    depth: usize,
    deeper: Vec<bool>,
}

impl Open {
    fn push(&mut self, object: bool) {
        if self.depth < 64 {
            self.bits = (self.bits & !(1 << self.depth)) | (u64::from(object) << self.depth);
        } else {
            self.deeper.push(object);
        }
        self.depth += 1;
    }

    /// The innermost open container (true: an object), if any.
    fn top(&self) -> Option<bool> {
        match self.depth {
            0 => None,
            d if d <= 64 => Some(self.bits >> (d - 1) & 1 == 1),
            _ => self.deeper.last().copied(),
        }
    }

    fn pop(&mut self) {
        if self.depth > 64 {
            self.deeper.pop();
        }
        self.depth = self.depth.saturating_sub(1);
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The high bit of each of the eight bytes (little-endian) that may end a run of plain string
/// content: a quote, a backslash or a control character. Exact up to the first such byte, so
/// its lowest set bit finds it; zero exactly when the block has none.
fn special(w: u64) -> u64 {
    let zero_in = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
    zero_in(w ^ (ONES * u64::from(b'"'))) | zero_in(w ^ (ONES * u64::from(b'\\'))) | below_space
}

/// How many of the first bytes of `b` are plain JSON string content (none a quote, a
/// backslash or a control character), eight at a time: where a string's scan resumes byte by
/// byte. The producer's depth check skips string content with it too.
pub fn plain_run(b: &[u8]) -> usize {
    let mut i = 0;
    while let Some(block) = b.get(i..i + 8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(block);
        let m = special(u64::from_le_bytes(w));
        if m != 0 {
            return i + (m.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    i + b[i..]
        .iter()
        .take_while(|&&c| c != b'"' && c != b'\\' && c >= 0x20)
        .count()
}

impl<'a> Scanner<'a> {
    fn err(&self, what: &str) -> String {
        match self.b.get(self.i) {
            Some(&c) if c.is_ascii_graphic() => format!(
                "the record is not valid JSON: {what} at byte {} ('{}')",
                self.i, c as char
            ),
            Some(_) => format!("the record is not valid JSON: {what} at byte {}", self.i),
            None => format!("the record is not valid JSON: {what} at its end"),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.i += 1;
        }
    }

    fn expect(&mut self, c: u8, what: &str) -> Result<(), String> {
        self.ws();
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(what))
        }
    }

    /// A value along `node`: into the members and elements some pointer names, skipping the
    /// rest; then the node's slots get the value's raw text.
    fn walk<N: PathNode>(&mut self, node: &N, found: &mut [Option<&'a str>]) -> Result<(), String> {
        self.ws();
        let start = self.i;
        match self.peek() {
            Some(b'{') if node.has_children() => self.walk_object(node, found)?,
            Some(b'[') if node.has_children() => self.walk_array(node, found)?,
            _ => self.skip_value()?,
        }
        if !node.slots().is_empty() {
            let raw = self
                .text
                .get(start..self.i)
                .ok_or_else(|| self.err("a value cut inside a character"))?;
            for &slot in node.slots() {
                if let Some(f) = found.get_mut(slot) {
                    *f = Some(raw);
                }
            }
        }
        Ok(())
    }

    fn walk_object<N: PathNode>(
        &mut self,
        node: &N,
        found: &mut [Option<&'a str>],
    ) -> Result<(), String> {
        self.items(b'}', "expected ',' or '}' in an object", |s, _| {
            s.ws();
            if s.peek() != Some(b'"') {
                return Err(s.err("expected a member name"));
            }
            let (start, escaped) = s.string()?;
            let raw = s
                .text
                .get(start..s.i)
                .ok_or_else(|| s.err("a member name cut inside a character"))?;
            let key: Cow<'_, str> = if escaped {
                Cow::Owned(
                    serde_json::from_str::<String>(raw)
                        .map_err(|e| s.err(&format!("a member name that does not decode ({e})")))?,
                )
            } else {
                Cow::Borrowed(&raw[1..raw.len() - 1])
            };
            s.expect(b':', "expected ':' after a member name")?;
            match node.member(&key) {
                Some(child) => {
                    // A later member of the same name replaces an earlier one entirely, as in
                    // jsonb: nothing found under the earlier one stays.
                    for &slot in child.slots_below() {
                        if let Some(f) = found.get_mut(slot) {
                            *f = None;
                        }
                    }
                    s.walk(child, found)
                }
                None => s.skip_value(),
            }
        })
    }

    fn walk_array<N: PathNode>(
        &mut self,
        node: &N,
        found: &mut [Option<&'a str>],
    ) -> Result<(), String> {
        self.items(
            b']',
            "expected ',' or ']' in an array",
            |s, index| match node.element(index) {
                Some(child) => s.walk(child, found),
                None => s.skip_value(),
            },
        )
    }

    /// The members or elements of the container opening here, each read by `item` (with its
    /// index), up to the `close` byte.
    fn items(
        &mut self,
        close: u8,
        what: &str,
        mut item: impl FnMut(&mut Self, usize) -> Result<(), String>,
    ) -> Result<(), String> {
        self.i += 1;
        self.ws();
        if self.peek() == Some(close) {
            self.i += 1;
            return Ok(());
        }
        let mut index = 0;
        loop {
            item(self, index)?;
            index += 1;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(c) if c == close => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(self.err(what)),
            }
        }
    }

    /// Validates and passes one value, containers included, without recursion.
    fn skip_value(&mut self) -> Result<(), String> {
        let mut open = Open::default();
        loop {
            // A value is expected here.
            self.ws();
            match self.peek() {
                Some(b'{') => {
                    self.i += 1;
                    self.ws();
                    if self.peek() == Some(b'}') {
                        self.i += 1;
                    } else {
                        open.push(true);
                        self.member_name()?;
                        continue;
                    }
                }
                Some(b'[') => {
                    self.i += 1;
                    self.ws();
                    if self.peek() == Some(b']') {
                        self.i += 1;
                    } else {
                        open.push(false);
                        continue;
                    }
                }
                Some(b'"') => {
                    self.string()?;
                }
                Some(b'-' | b'0'..=b'9') => self.number()?,
                Some(b't') => self.literal(b"true")?,
                Some(b'f') => self.literal(b"false")?,
                Some(b'n') => self.literal(b"null")?,
                _ => return Err(self.err("expected a value")),
            }
            // A value ended: close what it ends, or go on to the next member or element.
            loop {
                let Some(object) = open.top() else {
                    return Ok(());
                };
                self.ws();
                match (self.peek(), object) {
                    (Some(b','), true) => {
                        self.i += 1;
                        self.member_name()?;
                        break;
                    }
                    (Some(b','), false) => {
                        self.i += 1;
                        break;
                    }
                    (Some(b'}'), true) | (Some(b']'), false) => {
                        self.i += 1;
                        open.pop();
                    }
                    (_, true) => return Err(self.err("expected ',' or '}' in an object")),
                    (_, false) => return Err(self.err("expected ',' or ']' in an array")),
                }
            }
        }
    }

    /// A member's name and its colon.
    fn member_name(&mut self) -> Result<(), String> {
        self.ws();
        if self.peek() != Some(b'"') {
            return Err(self.err("expected a member name"));
        }
        self.string()?;
        self.expect(b':', "expected ':' after a member name")
    }

    /// A string, at its opening quote. Returns where it started and whether it has escapes.
    fn string(&mut self) -> Result<(usize, bool), String> {
        let b = self.b;
        let start = self.i;
        let mut i = start + 1;
        let mut escaped = false;
        loop {
            // Eight bytes at a time, up to the first quote, backslash or control character.
            i += plain_run(b.get(i..).unwrap_or_default());
            match b.get(i) {
                Some(b'"') => {
                    self.i = i + 1;
                    return Ok((start, escaped));
                }
                Some(b'\\') => {
                    escaped = true;
                    match b.get(i + 1) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                        Some(b'u')
                            if b.get(i + 2..i + 6)
                                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) =>
                        {
                            i += 6
                        }
                        Some(b'u') => {
                            self.i = i;
                            return Err(self.err("a \\u escape without four hex digits"));
                        }
                        _ => {
                            self.i = i;
                            return Err(self.err("an unknown escape in a string"));
                        }
                    }
                }
                Some(0..=0x1f) => {
                    self.i = i;
                    return Err(self.err("a control character in a string"));
                }
                // Not reached (`plain_run` stops only at a quote, a backslash or a control
                // byte); kept so that any other byte moves on rather than loops.
                Some(_) => i += 1,
                None => {
                    self.i = i;
                    return Err(self.err("an unterminated string"));
                }
            }
        }
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Result<(), String> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.err("a number without digits")),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.err("a number without digits after its point"));
            }
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.err("a number without digits in its exponent"));
            }
            self.digits();
        }
        Ok(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), String> {
        if self.b.get(self.i..self.i + word.len()) == Some(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(self.err("expected true, false or null"))
        }
    }
}

/// A string's content that the scanner passed: borrowed when it has no escapes.
pub(crate) fn unescaped(raw: &str) -> Option<&str> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.contains('\\')).then_some(inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A tree of pointers for the tests: (key, node) children and slots.
    #[derive(Default)]
    struct T {
        slots: Vec<usize>,
        below: Vec<usize>,
        kids: Vec<(String, T)>,
    }

    impl T {
        fn settle(&mut self) -> Vec<usize> {
            let mut below = self.slots.clone();
            for (_, kid) in &mut self.kids {
                below.extend(kid.settle());
            }
            self.below = below.clone();
            below
        }
    }

    impl PathNode for T {
        fn slots(&self) -> &[usize] {
            &self.slots
        }
        fn slots_below(&self) -> &[usize] {
            &self.below
        }
        fn has_children(&self) -> bool {
            !self.kids.is_empty()
        }
        fn member(&self, key: &str) -> Option<&Self> {
            self.kids.iter().find(|(k, _)| k == key).map(|(_, n)| n)
        }
        fn element(&self, index: usize) -> Option<&Self> {
            self.member(&index.to_string())
        }
    }

    fn tree<S: AsRef<str>>(pointers: &[&[S]]) -> T {
        let mut root = T::default();
        for (slot, tokens) in pointers.iter().enumerate() {
            let mut node = &mut root;
            for t in tokens.iter().map(AsRef::as_ref) {
                let at = match node.kids.iter().position(|(k, _)| k == t) {
                    Some(at) => at,
                    None => {
                        node.kids.push((t.to_string(), T::default()));
                        node.kids.len() - 1
                    }
                };
                node = &mut node.kids[at].1;
            }
            node.slots.push(slot);
        }
        root.settle();
        root
    }

    fn run<'a>(text: &'a str, pointers: &[&[&str]]) -> Result<Vec<Option<&'a str>>, String> {
        let t = tree(pointers);
        let mut found = vec![None; pointers.len()];
        scan(text, &t, &mut found)?;
        Ok(found)
    }

    #[test]
    fn captures_the_raw_text_of_every_pointed_value_and_nothing_else() {
        let text =
            r#" {"a": 1.5e3, "b": {"c": ["x", {"d": "y\"z"}], "e": null}, "f": [true, false] } "#;
        let found = run(
            text,
            &[
                &["a"],
                &["b", "c", "1", "d"],
                &["b", "e"],
                &["f", "1"],
                &["b"],
                &["g"],
                &["f", "2"],
            ],
        )
        .unwrap();
        assert_eq!(
            found,
            vec![
                Some("1.5e3"),
                Some(r#""y\"z""#),
                Some("null"),
                Some("false"),
                Some(r#"{"c": ["x", {"d": "y\"z"}], "e": null}"#),
                None,
                None,
            ]
        );
    }

    #[test]
    fn a_key_with_escapes_matches_its_unescaped_pointer_token_and_the_last_duplicate_wins() {
        let found = run(r#"{"a\/b": 1, "x": 1, "x": 2}"#, &[&["a/b"], &["x"]]).unwrap();
        assert_eq!(found, vec![Some("1"), Some("2")]);
        // The later member replaces the earlier one whole, as jsonb keeps only the last: a
        // value found inside the earlier one is gone.
        let text = r#"{"x": {"y": 1, "z": 3}, "x": {"z": 4}}"#;
        let found = run(text, &[&["x", "y"], &["x", "z"], &["x"]]).unwrap();
        assert_eq!(found, vec![None, Some("4"), Some(r#"{"z": 4}"#)]);
        let found = run(r#"{"x": {"y": 1}, "x": 2}"#, &[&["x", "y"]]).unwrap();
        assert_eq!(found, vec![None]);
    }

    #[test]
    fn invalid_json_is_refused_with_where() {
        for bad in [
            "",
            "{",
            "{\"a\":}",
            "{\"a\" 1}",
            "{\"a\":1,}",
            "[1,]",
            "[1 2]",
            "01",
            "1.",
            "-",
            "1e",
            "tru",
            "nul",
            "\"a",
            "\"\\x\"",
            "\"\\u12\"",
            "\"a\u{1}b\"",
            "{} {}",
            "{\"a\":[}",
            "[{]",
            "{1:2}",
        ] {
            let err = run(bad, &[&["a"]]).expect_err(bad);
            assert!(
                err.starts_with("the record is not valid JSON"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn nesting_far_deeper_than_the_stack_allows_is_validated_without_recursion() {
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(200_000), "]".repeat(200_000));
        assert_eq!(run(&deep, &[&["b"]]).unwrap(), vec![None]);
        let unbalanced = format!("[{}1{}", "[".repeat(100), "]".repeat(99));
        assert!(run(&unbalanced, &[]).is_err());
        let mixed = format!("{}{}", "[{\"k\":".repeat(70), "}]".repeat(70));
        assert!(run(&mixed, &[]).is_err(), "a missing value at the bottom");
        let mixed = format!("{}1{}", "[{\"k\":".repeat(70), "}]".repeat(70));
        assert!(run(&mixed, &[]).is_ok());
        let crossed = format!("{}1{}", "[{\"k\":".repeat(70), "]}".repeat(70));
        assert!(run(&crossed, &[]).is_err());
    }

    fn json() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "(\\PC|[\"\\\\/\u{0}-\u{1f}]){0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(6, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec(("[a-c/~\"]{0,3}", inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// Every path to a value of `v`, as tokens.
    fn paths(v: &serde_json::Value, at: Vec<String>, out: &mut Vec<Vec<String>>) {
        out.push(at.clone());
        match v {
            serde_json::Value::Array(a) => {
                for (i, e) in a.iter().enumerate() {
                    let mut p = at.clone();
                    p.push(i.to_string());
                    paths(e, p, out);
                }
            }
            serde_json::Value::Object(o) => {
                for (k, e) in o {
                    let mut p = at.clone();
                    p.push(k.clone());
                    paths(e, p, out);
                }
            }
            _ => {}
        }
    }

    fn pointer(tokens: &[String]) -> String {
        tokens
            .iter()
            .map(|t| format!("/{}", t.replace('~', "~0").replace('/', "~1")))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// What the scanner captures for any path (and a path that is not there) is what
        /// serde_json finds at that pointer, compact or pretty.
        #[test]
        fn captures_agree_with_serde_json(
            v in json(),
            pretty in any::<bool>(),
            pick in any::<proptest::sample::Index>(),
        ) {
            let text = if pretty {
                serde_json::to_string_pretty(&v)
            } else {
                serde_json::to_string(&v)
            }
            .unwrap();
            let mut all = Vec::new();
            paths(&v, vec![], &mut all);
            let chosen = all[pick.index(all.len())].clone();
            let mut missing = chosen.clone();
            missing.push("nope".into());
            let pointers: Vec<&[String]> = vec![&chosen, &missing, &all[0]];
            let t = tree(&pointers);
            let mut found = vec![None; 3];
            scan(&text, &t, &mut found).unwrap();
            let got: serde_json::Value =
                serde_json::from_str(found[0].expect("a path that is there")).unwrap();
            // Through the same text, so that serde_json's float parsing rounds both alike.
            let want = v
                .pointer(&pointer(&chosen))
                .map(|w| serde_json::from_str::<serde_json::Value>(&w.to_string()).unwrap());
            prop_assert_eq!(Some(got), want);
            if !pretty {
                // Compact text: the capture is exactly the value's own compact text.
                let exact = v.pointer(&pointer(&chosen)).map(|w| w.to_string());
                prop_assert_eq!(found[0].map(str::to_string), exact);
            }
            prop_assert_eq!(found[1].is_some(), v.pointer(&pointer(&missing)).is_some());
            prop_assert_eq!(found[2].map(str::trim), Some(text.trim()));
        }

        /// Any text, valid or damaged: the scanner accepts it exactly when serde_json does.
        #[test]
        fn validity_agrees_with_serde_json(
            v in json(),
            cut in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
            how in 0..3u8,
        ) {
            let mut bytes = serde_json::to_string(&v).unwrap().into_bytes();
            let at = cut.index(bytes.len() + 1);
            match how {
                0 => bytes.truncate(at),
                1 => bytes.insert(at, byte),
                _ => if at < bytes.len() { bytes[at] = byte },
            }
            let Ok(text) = std::str::from_utf8(&bytes) else { return Ok(()) };
            let theirs = serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok();
            let ours = scan(text, &T::default(), &mut []).is_ok();
            prop_assert_eq!(ours, theirs, "skipping everything: {:?}", text);
            // Along mapped paths, where objects and arrays are walked rather than skipped.
            let mut all = Vec::new();
            paths(&v, vec![], &mut all);
            let walked: Vec<&[String]> = all.iter().map(Vec::as_slice).collect();
            let mut found = vec![None; walked.len()];
            let ours = scan(text, &tree(&walked), &mut found).is_ok();
            prop_assert_eq!(ours, theirs, "walking every path: {:?}", text);
        }
    }

    #[test]
    fn the_eight_byte_skip_stops_at_every_special_byte() {
        for special_byte in [b'"', b'\\', 0u8, 0x1f] {
            for at in 0..8 {
                let mut w = *b"abcdefgh";
                w[at] = special_byte;
                let m = special(u64::from_le_bytes(w));
                assert_eq!(m.trailing_zeros() / 8, at as u32, "{special_byte} at {at}");
            }
        }
        assert_eq!(special(u64::from_le_bytes(*b" ~\x7f\x80\xff!#[")), 0);
    }

    #[test]
    fn a_plain_run_ends_at_the_first_quote_backslash_or_control_byte() {
        let naive = |b: &[u8]| {
            b.iter()
                .take_while(|&&c| c != b'"' && c != b'\\' && c >= 0x20)
                .count()
        };
        // Every length up to three blocks, the special byte at every place (or none).
        for len in 0..24 {
            for at in 0..=len {
                for special_byte in [b'"', b'\\', b'\n', 0u8] {
                    let mut b: Vec<u8> = (0..len).map(|i| b"a[{ \xc3\xa9~"[i % 7]).collect();
                    if at < len {
                        b[at] = special_byte;
                    }
                    assert_eq!(plain_run(&b), naive(&b), "{b:?}");
                }
            }
        }
    }
}
