//! Feature flags in flagd's format (`{"flags": {...}, "$evaluators": {...}, "metadata": {...}}`,
//! as OpenFeature's `FeatureFlag` objects and flagd's files hold them), evaluated as flagd
//! evaluates them: the same variant, reason and error for the same flag and context. Rules are
//! compiled once, when a flag set is parsed.
//!
//! A flag that cannot be used (a bad state, no variants, a default variant that is not one, a
//! rule with an unknown operator or a `$ref` to no evaluator) stays in the set as refused: it
//! answers PARSE_ERROR, as flagd answers it, and [`FlagSet::refused`] says why, so that a
//! caller can keep its last good version instead.
#![forbid(unsafe_code)]

mod fractional;
pub mod logic;
mod semver;

pub use fractional::{bucket_of, pair_hash};

use std::collections::BTreeMap;

use serde_json::{Map, Value};

pub use crate::logic::Context;
use crate::logic::Rule;

/// Why a document is no flag set at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DocumentError(String);

#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlagSet {
    flags: BTreeMap<String, Entry>,
    /// The flag set's metadata, which each flag's own overrides.
    metadata: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
enum Entry {
    Flag(Flag),
    Refused(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Flag {
    enabled: bool,
    variants: Map<String, Value>,
    default_variant: Option<String>,
    /// None when the flag has no rule (absent, or `{}`).
    targeting: Option<Rule>,
    metadata: Map<String, Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// The default variant, with no rule to decide.
    Static,
    /// The variant the rule chose.
    TargetingMatch,
    /// The default variant (or the caller's default) when the rule chose none.
    Default,
    /// The flag is off: the caller's default.
    Disabled,
    Error,
}

impl Reason {
    /// The name OpenFeature gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Static => "STATIC",
            Reason::TargetingMatch => "TARGETING_MATCH",
            Reason::Default => "DEFAULT",
            Reason::Disabled => "DISABLED",
            Reason::Error => "ERROR",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorCode {
    FlagNotFound,
    ParseError,
    General,
}

impl ErrorCode {
    /// The name OpenFeature gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::FlagNotFound => "FLAG_NOT_FOUND",
            ErrorCode::ParseError => "PARSE_ERROR",
            ErrorCode::General => "GENERAL",
        }
    }
}

/// One evaluation's answer. Without a value, the caller uses its own default.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution<'a> {
    pub value: Option<&'a Value>,
    pub variant: Option<&'a str>,
    pub reason: Reason,
    pub error: Option<(ErrorCode, String)>,
}

impl<'a> Resolution<'a> {
    fn error(code: ErrorCode, message: String) -> Self {
        Resolution {
            value: None,
            variant: None,
            reason: Reason::Error,
            error: Some((code, message)),
        }
    }

    fn variant(flag: &'a Flag, name: &'a str, reason: Reason) -> Self {
        Resolution {
            value: flag.variants.get(name),
            variant: Some(name),
            reason,
            error: None,
        }
    }

    /// The default variant, or the caller's default when the flag names none.
    fn default(flag: &'a Flag, reason: Reason) -> Self {
        match &flag.default_variant {
            Some(name) => Self::variant(flag, name, reason),
            None => Resolution {
                value: None,
                variant: None,
                reason: Reason::Default,
                error: None,
            },
        }
    }
}

impl FlagSet {
    /// Parses a flagd document. Only a document that is not a flag set at all is an error; a
    /// flag that cannot be used is kept as refused.
    pub fn parse(document: &Value) -> Result<Self, DocumentError> {
        let Value::Object(fields) = document else {
            return Err(DocumentError("a flag set is a JSON object".into()));
        };
        let evaluators = match fields.get("$evaluators") {
            None => Map::new(),
            Some(Value::Object(evaluators)) => evaluators.clone(),
            Some(_) => return Err(DocumentError("$evaluators must be an object".into())),
        };
        let metadata = match fields.get("metadata") {
            None => Map::new(),
            Some(value) => metadata(value).map_err(DocumentError)?,
        };
        let flags = match fields.get("flags") {
            None => Map::new(),
            Some(Value::Object(flags)) => flags.clone(),
            Some(_) => {
                return Err(DocumentError(
                    "flags must be an object of flags by key".into(),
                ))
            }
        };
        let flags = flags
            .into_iter()
            .map(|(key, definition)| {
                let entry =
                    Flag::parse(&definition, &evaluators).map_or_else(Entry::Refused, Entry::Flag);
                (key, entry)
            })
            .collect();
        Ok(FlagSet { flags, metadata })
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.flags.keys().map(String::as_str)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.flags.contains_key(key)
    }

    /// The flags that cannot be used, with why.
    pub fn refused(&self) -> impl Iterator<Item = (&str, &str)> {
        self.flags.iter().filter_map(|(key, entry)| match entry {
            Entry::Refused(reason) => Some((key.as_str(), reason.as_str())),
            Entry::Flag(_) => None,
        })
    }

    /// The metadata an evaluation of `key` answers with: the set's, overridden by the flag's.
    pub fn metadata(&self, key: &str) -> Map<String, Value> {
        let mut merged = self.metadata.clone();
        if let Some(Entry::Flag(flag)) = self.flags.get(key) {
            merged.extend(flag.metadata.clone());
        }
        merged
    }

    /// The default variant of the flag `key`, if it is a usable flag that names one.
    pub fn default_variant(&self, key: &str) -> Option<&str> {
        match self.flags.get(key)? {
            Entry::Flag(flag) => flag.default_variant.as_deref(),
            Entry::Refused(_) => None,
        }
    }

    /// Evaluates the flag `key` for `context` (its `targetingKey` and attributes), at
    /// `timestamp` (Unix seconds, which rules read as `$flagd.timestamp`).
    pub fn evaluate(&self, key: &str, context: &dyn Context, timestamp: i64) -> Resolution<'_> {
        match self.flags.get(key) {
            None => Resolution::error(
                ErrorCode::FlagNotFound,
                format!("flag {key:?} does not exist"),
            ),
            Some(Entry::Refused(reason)) => {
                Resolution::error(ErrorCode::ParseError, format!("flag {key:?}: {reason}"))
            }
            Some(Entry::Flag(flag)) => flag.evaluate(key, context, timestamp),
        }
    }
}

impl Flag {
    fn parse(definition: &Value, evaluators: &Map<String, Value>) -> Result<Flag, String> {
        let Value::Object(fields) = definition else {
            return Err("a flag is a JSON object".into());
        };
        if let Some(unknown) = fields.keys().find(|k| {
            !matches!(
                k.as_str(),
                "state" | "variants" | "defaultVariant" | "targeting" | "metadata"
            )
        }) {
            return Err(format!("unknown field {unknown:?}"));
        }
        let enabled = match fields.get("state").and_then(Value::as_str) {
            Some("ENABLED") => true,
            Some("DISABLED") => false,
            _ => return Err("state must be \"ENABLED\" or \"DISABLED\"".into()),
        };
        let variants = match fields.get("variants") {
            Some(Value::Object(variants)) if !variants.is_empty() => variants.clone(),
            _ => return Err("variants must be an object of at least one variant".into()),
        };
        let default_variant = match fields.get("defaultVariant") {
            None | Some(Value::Null) => None,
            Some(Value::String(name)) if name.is_empty() => None,
            Some(Value::String(name)) if variants.contains_key(name) => Some(name.clone()),
            Some(Value::String(name)) => {
                return Err(format!("the default variant {name:?} is not a variant"))
            }
            Some(Value::Bool(b)) if variants.contains_key(&b.to_string()) => Some(b.to_string()),
            Some(other) => return Err(format!("defaultVariant {other} names no variant")),
        };
        let targeting = match fields.get("targeting") {
            None => None,
            Some(Value::Object(rule)) if rule.is_empty() => None,
            Some(rule @ Value::Object(_)) => {
                let rule = resolve_refs(rule, evaluators, 0)?;
                Some(Rule::compile(&rule).map_err(|e| format!("targeting: {e}"))?)
            }
            Some(_) => return Err("targeting must be a JSON Logic object".into()),
        };
        let metadata = fields
            .get("metadata")
            .map(metadata)
            .transpose()?
            .unwrap_or_default();
        Ok(Flag {
            enabled,
            variants,
            default_variant,
            targeting,
            metadata,
        })
    }

    fn evaluate(&self, key: &str, context: &dyn Context, timestamp: i64) -> Resolution<'_> {
        if !self.enabled {
            return Resolution {
                value: None,
                variant: None,
                reason: Reason::Disabled,
                error: None,
            };
        }
        let Some(rule) = &self.targeting else {
            return Resolution::default(self, Reason::Static);
        };
        let chosen = rule.evaluate(context, key, timestamp);
        let name = match &chosen {
            Value::Null => return Resolution::default(self, Reason::Default),
            Value::String(name) => std::borrow::Cow::Borrowed(name.as_str()),
            Value::Bool(_) | Value::Number(_) => std::borrow::Cow::Owned(logic::to_text(&chosen)),
            other => {
                return Resolution::error(
                    ErrorCode::General,
                    format!("targeting answered {other}, which names no variant"),
                )
            }
        };
        match self.variants.get_key_value(&*name) {
            Some((name, _)) => Resolution::variant(self, name, Reason::TargetingMatch),
            None => Resolution::error(
                ErrorCode::General,
                format!("targeting chose {name:?}, which is not a variant"),
            ),
        }
    }
}

/// Metadata: an object of strings, numbers and booleans.
fn metadata(value: &Value) -> Result<Map<String, Value>, String> {
    let Value::Object(fields) = value else {
        return Err("metadata must be an object".into());
    };
    match fields
        .iter()
        .find(|(_, v)| !matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_)))
    {
        Some((key, _)) => Err(format!(
            "metadata {key:?} must be a string, a number or a boolean"
        )),
        None => Ok(fields.clone()),
    }
}

/// How deep `$ref`s may nest in each other: deeper is a cycle.
const MAX_REF_DEPTH: usize = 16;

/// The rule with each `{"$ref": name}` of a known evaluator replaced by it; one to an unknown
/// evaluator stays, and does not compile.
fn resolve_refs(
    rule: &Value,
    evaluators: &Map<String, Value>,
    depth: usize,
) -> Result<Value, String> {
    if depth > MAX_REF_DEPTH {
        return Err("$ref: evaluators refer to each other in a cycle".into());
    }
    Ok(match rule {
        Value::Object(fields) => {
            if let (1, Some(Value::String(name))) = (fields.len(), fields.get("$ref")) {
                if let Some(evaluator) = evaluators.get(name) {
                    return resolve_refs(evaluator, evaluators, depth + 1);
                }
                return Err(format!("$ref names {name:?}, which is no evaluator"));
            }
            Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), resolve_refs(v, evaluators, depth)?)))
                    .collect::<Result<_, String>>()?,
            )
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| resolve_refs(v, evaluators, depth))
                .collect::<Result<_, _>>()?,
        ),
        other => other.clone(),
    })
}
