//! librdkafka properties as users pass them (`-X key=value`, as kcat takes them).

use crate::error::ConfigError;

/// Parses `key=value` strings; the error names the `X` flag and the bad entry.
pub fn parse_properties(raw: &[String]) -> Result<Vec<(String, String)>, ConfigError> {
    raw.iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
            _ => Err(ConfigError::new("X", format!("{kv:?} is not key=value"))),
        })
        .collect()
}

/// The properties with secrets (passwords, keys, tokens) hidden, for logs.
pub fn redact_properties(props: &[(String, String)]) -> Vec<(String, String)> {
    props
        .iter()
        .map(|(k, v)| {
            let secret = ["password", "secret", "key", "token"]
                .iter()
                .any(|s| k.contains(s));
            let shown = if secret {
                "<redacted>".into()
            } else {
                v.clone()
            };
            (k.clone(), shown)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_redacts() {
        let raw = vec!["sasl.password=a=b".to_string(), "acks=all".to_string()];
        let props = parse_properties(&raw).unwrap();
        assert_eq!(props[0], ("sasl.password".into(), "a=b".into()));
        assert_eq!(redact_properties(&props)[0].1, "<redacted>");
        assert_eq!(redact_properties(&props)[1].1, "all");
        assert_eq!(parse_properties(&["nope".into()]).unwrap_err().setting, "X");
    }
}
