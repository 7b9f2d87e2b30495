//! flagd's `sem_ver`: `[version, operator, version]`, with `=`, `!=`, `<`, `<=`, `>`, `>=`,
//! `^` (the same major version) and `~` (the same major and minor). A leading `v` is dropped,
//! a partial version is padded (`1.2` is `1.2.0`), numbers are read as their text, and build
//! metadata does not count. Anything else answers null.

use std::cmp::Ordering;

use serde_json::Value;

use crate::logic::to_text;

pub fn sem_ver(args: &[Value]) -> Option<bool> {
    let [left, Value::String(op), right] = args else {
        return None;
    };
    let (a, b) = (version(left)?, version(right)?);
    let order = (a.major, a.minor, a.patch, &a.pre).cmp(&(b.major, b.minor, b.patch, &b.pre));
    Some(match op.as_str() {
        "=" => order == Ordering::Equal,
        "!=" => order != Ordering::Equal,
        "<" => order == Ordering::Less,
        "<=" => order != Ordering::Greater,
        ">" => order == Ordering::Greater,
        ">=" => order != Ordering::Less,
        "^" => a.major == b.major,
        "~" => a.major == b.major && a.minor == b.minor,
        _ => return None,
    })
}

fn version(value: &Value) -> Option<semver::Version> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(_) => to_text(value),
        _ => return None,
    };
    let text = text
        .strip_prefix('v')
        .or_else(|| text.strip_prefix('V'))
        .unwrap_or(&text);
    let core_end = text.find(['-', '+']).unwrap_or(text.len());
    let (core, rest) = text.split_at(core_end);
    let padding = match core.matches('.').count() {
        0 => ".0.0",
        1 => ".0",
        _ => "",
    };
    semver::Version::parse(&format!("{core}{padding}{rest}")).ok()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn check(a: Value, op: &str, b: Value) -> Option<bool> {
        sem_ver(&[a, json!(op), b])
    }

    #[test]
    fn versions_compare_as_flagd_compares_them() {
        assert_eq!(check(json!("1.0.0"), "=", json!("v1")), Some(true));
        assert_eq!(check(json!("2.0.0-alpha"), "<", json!("2.0.0")), Some(true));
        assert_eq!(check(json!("1.0.0+a"), "=", json!("1.0.0+b")), Some(true));
        assert_eq!(check(json!("3.9.9"), "^", json!("3.0.0")), Some(true));
        assert_eq!(check(json!("3.1.0"), "~", json!("3.0.0")), Some(false));
        assert_eq!(check(json!(1.2), ">", json!("1.1.9")), Some(true));
        assert_eq!(check(json!("2.0.0.0"), "=", json!("2.0.0")), None);
        assert_eq!(check(json!("1.0.0"), "===", json!("1.0.0")), None);
        assert_eq!(sem_ver(&[json!("1.0.0"), json!("=")]), None);
    }
}
