//! JSON Logic, as flagd's targeting rules use it: the operators of flagd's `targeting.json`
//! schema, with JavaScript's coercions as json-logic-js applies them, and flagd's own
//! `fractional`, `sem_ver`, `starts_with` and `ends_with`. A rule is compiled once, when its
//! flag is loaded, and evaluated against a request's context as often as needed.

use std::{borrow::Cow, cell::OnceCell};

use serde_json::{Map, Number, Value};

use crate::fractional::fractional;

/// A compiled rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule(Expr);

/// Why a rule does not compile (flagd answers such a flag with PARSE_ERROR).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RuleError(pub String);

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Literal(Value),
    /// An array whose items are rules: each is evaluated.
    Array(Vec<Expr>),
    Var(Vec<Expr>),
    If(Vec<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
    /// map, filter, all, none, some: the second argument runs on each item of the first.
    Each(Each, Box<Expr>, Box<Expr>),
    Reduce(Box<Expr>, Box<Expr>, Box<Expr>),
    /// An operator whose arguments are all evaluated first.
    Call(Op, Vec<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Each {
    Map,
    Filter,
    All,
    None,
    Some,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Missing,
    MissingSome,
    Equal,
    StrictEqual,
    NotEqual,
    StrictNotEqual,
    Greater,
    GreaterOrEqual,
    Less,
    LessOrEqual,
    Not,
    Truthy,
    Remainder,
    Divide,
    Multiply,
    Add,
    Subtract,
    Min,
    Max,
    In,
    Cat,
    Substr,
    Merge,
    Fractional,
    SemVer,
    StartsWith,
    EndsWith,
}

impl Rule {
    pub fn compile(rule: &Value) -> Result<Self, RuleError> {
        compile(rule).map(Rule)
    }

    /// Evaluates the rule for the flag `flag_key` on `context`, at `timestamp`: flagd's
    /// `$flagd.flagKey` and `$flagd.timestamp` read as if they were in the context, which is
    /// never copied.
    pub fn evaluate(&self, context: &dyn Context, flag_key: &str, timestamp: i64) -> Value {
        let root = Root {
            context,
            flag_key,
            timestamp,
            flagd: OnceCell::new(),
        };
        let scope = Scope {
            data: None,
            root: &root,
        };
        scope.eval(&self.0)
    }
}

fn compile(value: &Value) -> Result<Expr, RuleError> {
    match value {
        Value::Array(items) => Ok(Expr::Array(
            items.iter().map(compile).collect::<Result<_, _>>()?,
        )),
        Value::Object(fields) if fields.len() == 1 => {
            let (name, args) = fields.iter().next().expect("one field");
            operation(name, args)
        }
        _ => Ok(Expr::Literal(value.clone())),
    }
}

/// The arguments of an operation: an array's items, or a lone value as the only one.
fn arguments(args: &Value) -> Result<Vec<Expr>, RuleError> {
    match args {
        Value::Array(items) => items.iter().map(compile).collect(),
        other => Ok(vec![compile(other)?]),
    }
}

fn operation(name: &str, args: &Value) -> Result<Expr, RuleError> {
    let mut list = arguments(args)?;
    let each = |each, mut list: Vec<Expr>| {
        if list.len() != 2 {
            return Err(RuleError(format!("{name} takes two arguments")));
        }
        let body = list.pop().expect("two");
        let items = list.pop().expect("two");
        Ok(Expr::Each(each, Box::new(items), Box::new(body)))
    };
    let op = match name {
        "var" => return Ok(Expr::Var(list)),
        "if" | "?:" => return Ok(Expr::If(list)),
        "and" => return Ok(Expr::And(list)),
        "or" => return Ok(Expr::Or(list)),
        "map" => return each(Each::Map, list),
        "filter" => return each(Each::Filter, list),
        "all" => return each(Each::All, list),
        "none" => return each(Each::None, list),
        "some" => return each(Each::Some, list),
        "reduce" => {
            if list.len() != 3 {
                return Err(RuleError("reduce takes three arguments".into()));
            }
            let initial = list.pop().expect("three");
            let body = list.pop().expect("three");
            let items = list.pop().expect("three");
            return Ok(Expr::Reduce(
                Box::new(items),
                Box::new(body),
                Box::new(initial),
            ));
        }
        "missing" => Op::Missing,
        "missing_some" => Op::MissingSome,
        "==" => Op::Equal,
        "===" => Op::StrictEqual,
        "!=" => Op::NotEqual,
        "!==" => Op::StrictNotEqual,
        ">" => Op::Greater,
        ">=" => Op::GreaterOrEqual,
        "<" => Op::Less,
        "<=" => Op::LessOrEqual,
        "!" => Op::Not,
        "!!" => Op::Truthy,
        "%" => Op::Remainder,
        "/" => Op::Divide,
        "*" => Op::Multiply,
        "+" => Op::Add,
        "-" => Op::Subtract,
        "min" => Op::Min,
        "max" => Op::Max,
        "in" => Op::In,
        "cat" => Op::Cat,
        "substr" => Op::Substr,
        "merge" => Op::Merge,
        "fractional" => Op::Fractional,
        "sem_ver" => Op::SemVer,
        "starts_with" => Op::StartsWith,
        "ends_with" => Op::EndsWith,
        other => return Err(RuleError(format!("unknown operator {other:?}"))),
    };
    list.shrink_to_fit();
    Ok(Expr::Call(op, list))
}

/// The evaluation context of one evaluation, with flagd's `$flagd` properties made only when a
/// rule reads them.
struct Root<'a> {
    context: &'a dyn Context,
    flag_key: &'a str,
    timestamp: i64,
    flagd: OnceCell<Value>,
}

impl Root<'_> {
    fn flagd(&self) -> &Value {
        self.flagd.get_or_init(
            || serde_json::json!({"flagKey": self.flag_key, "timestamp": self.timestamp}),
        )
    }

    /// `var`'s path in the context, `$flagd` included.
    fn lookup(&self, path: &Value) -> Option<Cow<'_, Value>> {
        let path = match var_path(path) {
            VarPath::Keys(path) => path,
            VarPath::Nothing => return None,
            VarPath::Whole => {
                let mut whole = self.context.fields();
                whole.insert("$flagd".into(), self.flagd().clone());
                return Some(Cow::Owned(Value::Object(whole)));
            }
        };
        match path.split_once('.') {
            Some(("$flagd", rest)) => descend(self.flagd(), rest.split('.')).map(Cow::Borrowed),
            None if path == "$flagd" => Some(Cow::Borrowed(self.flagd())),
            _ => self.context.lookup(&path),
        }
    }
}

/// What a rule reads of an evaluation context: its fields, by `var` path. A JSON object is one;
/// a caller that has the fields elsewhere (a request) can answer the paths rules read without
/// building an object of every field for each evaluation.
pub trait Context {
    /// The value at a dotted path (`"user.email"`, `"items.0"`), if there is one.
    fn lookup(&self, path: &str) -> Option<Cow<'_, Value>>;
    /// Every field, for a rule that reads the whole context (`{"var": ""}`).
    fn fields(&self) -> Map<String, Value>;

    /// The `targetingKey`, if it is text: what `fractional` buckets by default.
    fn targeting_key(&self) -> Option<Cow<'_, str>> {
        match self.lookup("targetingKey")? {
            Cow::Borrowed(Value::String(key)) => Some(Cow::Borrowed(key)),
            Cow::Owned(Value::String(key)) => Some(Cow::Owned(key)),
            _ => None,
        }
    }
}

impl Context for Map<String, Value> {
    fn lookup(&self, path: &str) -> Option<Cow<'_, Value>> {
        let (first, rest) = match path.split_once('.') {
            Some((first, rest)) => (first, Some(rest)),
            None => (path, None),
        };
        let top = self.get(first)?;
        descend(top, rest.into_iter().flat_map(|r| r.split('.'))).map(Cow::Borrowed)
    }

    fn fields(&self) -> Map<String, Value> {
        self.clone()
    }
}

/// Where an evaluation is: the data `var` reads (None: the context; else an item inside map,
/// filter and the like), and the context, which flagd's operators read.
struct Scope<'a> {
    data: Option<&'a Value>,
    root: &'a Root<'a>,
}

impl Scope<'_> {
    fn eval(&self, expr: &Expr) -> Value {
        match expr {
            Expr::Literal(value) => value.clone(),
            Expr::Array(items) => Value::Array(items.iter().map(|e| self.eval(e)).collect()),
            Expr::Var(args) => self.var(args),
            Expr::If(args) => self.branch(args),
            Expr::And(args) => self.deciding(args, false),
            Expr::Or(args) => self.deciding(args, true),
            Expr::Each(each, items, body) => self.each(*each, items, body),
            Expr::Reduce(items, body, initial) => self.reduce(items, body, initial),
            Expr::Call(op, args) => {
                let values: Vec<Value> = args.iter().map(|e| self.eval(e)).collect();
                self.call(*op, &values)
            }
        }
    }

    fn var(&self, args: &[Expr]) -> Value {
        let path = args.first().map_or(Value::Null, |e| self.eval(e));
        match self.lookup(&path) {
            Some(value) if !value.is_null() => value.into_owned(),
            _ => args.get(1).map_or(Value::Null, |e| self.eval(e)),
        }
    }

    /// `if`: condition, value, ... and an optional last value for when none holds.
    fn branch(&self, args: &[Expr]) -> Value {
        let mut pairs = args.chunks_exact(2);
        for pair in &mut pairs {
            if truthy(&self.eval(&pair[0])) {
                return self.eval(&pair[1]);
            }
        }
        pairs
            .remainder()
            .first()
            .map_or(Value::Null, |e| self.eval(e))
    }

    /// `and` and `or`: the first operand that decides, or the last.
    fn deciding(&self, args: &[Expr], stop_when: bool) -> Value {
        let mut last = Value::Null;
        for arg in args {
            last = self.eval(arg);
            if truthy(&last) == stop_when {
                break;
            }
        }
        last
    }

    fn lookup(&self, path: &Value) -> Option<Cow<'_, Value>> {
        match self.data {
            None => self.root.lookup(path),
            Some(data) => lookup(data, path).map(Cow::Borrowed),
        }
    }

    fn within<'b>(&'b self, data: &'b Value) -> Scope<'b> {
        Scope {
            data: Some(data),
            root: self.root,
        }
    }

    fn each(&self, each: Each, items: &Expr, body: &Expr) -> Value {
        let items = match self.eval(items) {
            Value::Array(items) => items,
            _ => Vec::new(),
        };
        let test = |item: &Value| truthy(&self.within(item).eval(body));
        match each {
            Each::Map => Value::Array(items.iter().map(|i| self.within(i).eval(body)).collect()),
            Each::Filter => Value::Array(items.into_iter().filter(|i| test(i)).collect()),
            Each::All => Value::Bool(!items.is_empty() && items.iter().all(test)),
            Each::None => Value::Bool(!items.iter().any(test)),
            Each::Some => Value::Bool(items.iter().any(test)),
        }
    }

    fn reduce(&self, items: &Expr, body: &Expr, initial: &Expr) -> Value {
        let mut accumulator = self.eval(initial);
        if let Value::Array(items) = self.eval(items) {
            for current in items {
                let data = Value::Object(Map::from_iter([
                    ("current".to_owned(), current),
                    ("accumulator".to_owned(), accumulator),
                ]));
                accumulator = self.within(&data).eval(body);
            }
        }
        accumulator
    }

    fn call(&self, op: Op, args: &[Value]) -> Value {
        let arg = |i: usize| args.get(i).unwrap_or(&Value::Null);
        match op {
            Op::Missing => self.missing(args),
            Op::MissingSome => self.missing_some(arg(0), arg(1)),
            Op::Equal => Value::Bool(loose_equal(arg(0), arg(1))),
            Op::NotEqual => Value::Bool(!loose_equal(arg(0), arg(1))),
            Op::StrictEqual => Value::Bool(strict_equal(arg(0), arg(1))),
            Op::StrictNotEqual => Value::Bool(!strict_equal(arg(0), arg(1))),
            Op::Greater => Value::Bool(compare(arg(1), arg(0), false)),
            Op::GreaterOrEqual => Value::Bool(compare(arg(1), arg(0), true)),
            Op::Less => Value::Bool(chain(args, false)),
            Op::LessOrEqual => Value::Bool(chain(args, true)),
            Op::Not => Value::Bool(!truthy(arg(0))),
            Op::Truthy => Value::Bool(truthy(arg(0))),
            Op::Remainder => number(to_number(arg(0)) % to_number(arg(1))),
            Op::Divide => number(to_number(arg(0)) / to_number(arg(1))),
            Op::Multiply => number(args.iter().map(to_number).product()),
            Op::Add => number(args.iter().map(to_number).sum()),
            Op::Subtract => match args {
                [only] => number(-to_number(only)),
                _ => number(to_number(arg(0)) - to_number(arg(1))),
            },
            Op::Min => extreme(args, f64::min),
            Op::Max => extreme(args, f64::max),
            Op::In => Value::Bool(contains(arg(1), arg(0))),
            Op::Cat => Value::String(args.iter().map(to_text).collect()),
            Op::Substr => substr(arg(0), arg(1), args.get(2)),
            Op::Merge => Value::Array(
                args.iter()
                    .flat_map(|a| match a {
                        Value::Array(items) => items.clone(),
                        other => vec![other.clone()],
                    })
                    .collect(),
            ),
            Op::Fractional => {
                let targeting_key = self.root.context.targeting_key();
                fractional(args, self.root.flag_key, targeting_key.as_deref()).unwrap_or_default()
            }
            Op::SemVer => crate::semver::sem_ver(args).map_or(Value::Null, Value::Bool),
            Op::StartsWith => affix(args, |s, p| s.starts_with(p)),
            Op::EndsWith => affix(args, |s, p| s.ends_with(p)),
        }
    }

    fn missing(&self, args: &[Value]) -> Value {
        let keys: &[Value] = match args {
            [Value::Array(keys), ..] => keys,
            keys => keys,
        };
        Value::Array(
            keys.iter()
                .filter(|key| {
                    self.lookup(key)
                        .is_none_or(|v| v.is_null() || v.as_str() == Some(""))
                })
                .cloned()
                .collect(),
        )
    }

    fn missing_some(&self, need: &Value, keys: &Value) -> Value {
        let keys = keys.as_array().map_or(&[][..], Vec::as_slice);
        let missing = self.missing(&[Value::Array(keys.to_vec())]);
        let found = keys.len() - missing.as_array().map_or(0, Vec::len);
        if (found as f64) >= to_number(need) {
            Value::Array(Vec::new())
        } else {
            missing
        }
    }
}

/// `var`'s path in `data`: dotted keys and array indexes; `""` or null is the whole.
fn lookup<'a>(data: &'a Value, path: &Value) -> Option<&'a Value> {
    match var_path(path) {
        VarPath::Whole => Some(data),
        VarPath::Keys(path) => descend(data, path.split('.')),
        VarPath::Nothing => None,
    }
}

/// What a `var` path names.
enum VarPath<'p> {
    /// `""` or null: the whole data.
    Whole,
    /// Dotted keys and array indexes.
    Keys(Cow<'p, str>),
    /// Not text nor a number: nothing.
    Nothing,
}

fn var_path(path: &Value) -> VarPath<'_> {
    match path {
        Value::Null => VarPath::Whole,
        Value::String(s) if s.is_empty() => VarPath::Whole,
        Value::String(s) => VarPath::Keys(Cow::Borrowed(s)),
        Value::Number(n) => VarPath::Keys(Cow::Owned(to_text(&Value::Number(n.clone())))),
        _ => VarPath::Nothing,
    }
}

/// The value at `keys` under `value`: object fields, and array items by index.
pub fn descend<'a, 'k>(value: &'a Value, keys: impl Iterator<Item = &'k str>) -> Option<&'a Value> {
    keys.into_iter().try_fold(value, |value, key| match value {
        Value::Object(fields) => fields.get(key),
        Value::Array(items) => items.get(key.parse::<usize>().ok()?),
        _ => None,
    })
}

/// JavaScript's truthiness: null, false, 0, NaN, "" and [] are false.
pub fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0 && !f.is_nan()),
        Value::String(s) => !s.is_empty(),
        Value::Array(items) => !items.is_empty(),
        Value::Object(_) => true,
    }
}

/// JavaScript's Number(): null 0, booleans 0 and 1, strings parsed (blank is 0), NaN else.
fn to_number(value: &Value) -> f64 {
    match value {
        Value::Null => 0.0,
        Value::Bool(b) => f64::from(u8::from(*b)),
        Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        Value::String(s) if s.trim().is_empty() => 0.0,
        Value::String(s) => s.trim().parse().unwrap_or(f64::NAN),
        Value::Array(items) => match items.as_slice() {
            [] => 0.0,
            [one] => to_number(one),
            _ => f64::NAN,
        },
        Value::Object(_) => f64::NAN,
    }
}

/// JavaScript's String(): a whole number without a fraction, arrays joined with commas.
pub fn to_text(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => {
            if n.is_i64() || n.is_u64() {
                n.to_string()
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() < 1e21 {
                    format!("{f:.0}")
                } else {
                    f.to_string()
                }
            }
        }
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                if i.is_null() {
                    String::new()
                } else {
                    to_text(i)
                }
            })
            .collect::<Vec<_>>()
            .join(","),
        Value::Object(_) => "[object Object]".into(),
    }
}

/// A number as JSON: whole results as integers, so that `1 + 1` is `2` as flag authors expect;
/// NaN and infinities, which JSON has not, as null.
fn number(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 {
        Value::from(f as i64)
    } else {
        Number::from_f64(f).map_or(Value::Null, Value::Number)
    }
}

fn extreme(args: &[Value], pick: fn(f64, f64) -> f64) -> Value {
    let mut numbers = args.iter().map(to_number);
    let Some(first) = numbers.next() else {
        return Value::Null;
    };
    let result = numbers.fold(first, |a, b| {
        if a.is_nan() || b.is_nan() {
            f64::NAN
        } else {
            pick(a, b)
        }
    });
    number(result)
}

fn strict_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(_) | Value::Object(_), _) | (_, Value::Array(_) | Value::Object(_)) => false,
        _ => a == b,
    }
}

/// JavaScript's `==` on JSON values.
fn loose_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::Null, _) | (_, Value::Null) => false,
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Array(_) | Value::Object(_), Value::Array(_) | Value::Object(_)) => false,
        (Value::Array(_) | Value::Object(_), other)
        | (other, Value::Array(_) | Value::Object(_)) => {
            let text = to_text(if matches!(a, Value::Array(_) | Value::Object(_)) {
                a
            } else {
                b
            });
            loose_equal(&Value::String(text), other)
        }
        _ => to_number(a) == to_number(b),
    }
}

/// JavaScript's `<` (or `<=`): strings by code units when both are strings, numbers else.
fn compare(a: &Value, b: &Value, or_equal: bool) -> bool {
    if let (Value::String(x), Value::String(y)) = (a, b) {
        return if or_equal { x <= y } else { x < y };
    }
    let (x, y) = (to_number(a), to_number(b));
    if or_equal {
        x <= y
    } else {
        x < y
    }
}

/// `<` and `<=` with two arguments, or three for "between".
fn chain(args: &[Value], or_equal: bool) -> bool {
    match args {
        [a, b] => compare(a, b, or_equal),
        [a, b, c] => compare(a, b, or_equal) && compare(b, c, or_equal),
        _ => false,
    }
}

fn contains(haystack: &Value, needle: &Value) -> bool {
    match haystack {
        Value::String(s) => s.contains(&to_text(needle)),
        Value::Array(items) => items.iter().any(|item| strict_equal(item, needle)),
        _ => false,
    }
}

/// JavaScript's `substr`: a negative start counts from the end, a negative length leaves that
/// many characters off the end.
fn substr(text: &Value, start: &Value, length: Option<&Value>) -> Value {
    let chars: Vec<char> = to_text(text).chars().collect();
    let n = chars.len() as i64;
    let start = to_number(start);
    let start = if start.is_nan() { 0 } else { start as i64 };
    let from = if start < 0 {
        (n + start).max(0)
    } else {
        start.min(n)
    };
    let to = match length.map(to_number) {
        None => n,
        Some(l) if l.is_nan() => from,
        Some(l) if l < 0.0 => (n + l as i64).max(from),
        Some(l) => (from + l as i64).min(n),
    };
    Value::String(chars[from as usize..to as usize].iter().collect())
}

/// `starts_with` and `ends_with`: two strings, else null.
fn affix(args: &[Value], test: fn(&str, &str) -> bool) -> Value {
    match args {
        [Value::String(s), Value::String(affix)] => Value::Bool(test(s, affix)),
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn eval(rule: Value, data: Value) -> Value {
        let data = data.as_object().cloned().unwrap_or_default();
        Rule::compile(&rule).unwrap().evaluate(&data, "flag", 0)
    }

    #[test]
    fn the_standard_operators_behave_as_json_logic_does() {
        let data = json!({"a": {"b": [10, 20]}, "s": "hello", "n": null});
        assert_eq!(eval(json!({"var": "a.b.1"}), data.clone()), json!(20));
        assert_eq!(eval(json!({"var": ["n", 5]}), data.clone()), json!(5));
        assert_eq!(eval(json!({"var": ["x", 5]}), data.clone()), json!(5));
        assert_eq!(
            eval(json!({"if": [false, 1, null, 2, 3]}), json!({})),
            json!(3)
        );
        assert_eq!(eval(json!({"if": [false, 1]}), json!({})), json!(null));
        assert_eq!(eval(json!({"and": [1, "", 2]}), json!({})), json!(""));
        assert_eq!(eval(json!({"or": [0, "x", 2]}), json!({})), json!("x"));
        assert_eq!(eval(json!({"==": [1, "1"]}), json!({})), json!(true));
        assert_eq!(eval(json!({"===": [1, "1"]}), json!({})), json!(false));
        assert_eq!(eval(json!({"===": [1, 1.0]}), json!({})), json!(true));
        assert_eq!(eval(json!({"==": [null, 0]}), json!({})), json!(false));
        assert_eq!(eval(json!({"<": [1, 2, 3]}), json!({})), json!(true));
        assert_eq!(eval(json!({"<=": [1, 1, 0]}), json!({})), json!(false));
        assert_eq!(eval(json!({">": ["b", "a"]}), json!({})), json!(true));
        assert_eq!(eval(json!({"+": ["1", 2]}), json!({})), json!(3));
        assert_eq!(eval(json!({"-": [5]}), json!({})), json!(-5));
        assert_eq!(eval(json!({"/": [1, 4]}), json!({})), json!(0.25));
        assert_eq!(eval(json!({"%": [7, 3]}), json!({})), json!(1));
        assert_eq!(eval(json!({"max": [1, 9, 3]}), json!({})), json!(9));
        assert_eq!(
            eval(json!({"in": ["ell", {"var": "s"}]}), data.clone()),
            json!(true)
        );
        assert_eq!(eval(json!({"in": [2, [1, 2]]}), json!({})), json!(true));
        assert_eq!(
            eval(json!({"cat": ["a", 1.0, null, true]}), json!({})),
            json!("a1nulltrue")
        );
        assert_eq!(
            eval(json!({"substr": ["hello", -3, -1]}), json!({})),
            json!("ll")
        );
        assert_eq!(
            eval(json!({"merge": [[1], 2, [3, [4]]]}), json!({})),
            json!([1, 2, 3, [4]])
        );
        assert_eq!(
            eval(json!({"missing": ["s", "x", "n"]}), data.clone()),
            json!(["x", "n"])
        );
        assert_eq!(
            eval(json!({"missing_some": [1, ["s", "x"]]}), data.clone()),
            json!([])
        );
        assert_eq!(eval(json!({"!": [[]]}), json!({})), json!(true));
        assert_eq!(eval(json!({"!!": ["0"]}), json!({})), json!(true));
    }

    #[test]
    fn array_operators_rebind_the_data_to_each_item() {
        let data = json!({"xs": [1, 2, 3]});
        let doubled = json!({"map": [{"var": "xs"}, {"*": [{"var": ""}, 2]}]});
        assert_eq!(eval(doubled, data.clone()), json!([2, 4, 6]));
        let big = json!({"filter": [{"var": "xs"}, {">": [{"var": ""}, 1]}]});
        assert_eq!(eval(big, data.clone()), json!([2, 3]));
        let sum = json!({"reduce": [{"var": "xs"}, {"+": [{"var": "current"}, {"var": "accumulator"}]}, 0]});
        assert_eq!(eval(sum, data.clone()), json!(6));
        assert_eq!(eval(json!({"all": [[], true]}), json!({})), json!(false));
        assert_eq!(
            eval(
                json!({"some": [{"var": "xs"}, {"==": [{"var": ""}, 2]}]}),
                data.clone()
            ),
            json!(true)
        );
        assert_eq!(
            eval(
                json!({"none": [{"var": "xs"}, {"==": [{"var": ""}, 9]}]}),
                data
            ),
            json!(true)
        );
    }

    #[test]
    fn an_unknown_operator_does_not_compile_and_an_object_of_two_keys_is_data() {
        let error = Rule::compile(&json!({"if": [{"nope": [1]}, 1, 2]})).unwrap_err();
        assert_eq!(error.0, "unknown operator \"nope\"");
        assert_eq!(
            eval(json!({"a": 1, "b": 2}), json!({})),
            json!({"a": 1, "b": 2})
        );
    }

    #[test]
    fn flagd_string_operators_answer_null_on_anything_but_two_strings() {
        assert_eq!(
            eval(json!({"starts_with": ["abc", "ab"]}), json!({})),
            json!(true)
        );
        assert_eq!(
            eval(json!({"ends_with": ["abc", "bc"]}), json!({})),
            json!(true)
        );
        assert_eq!(
            eval(json!({"starts_with": [123, "1"]}), json!({})),
            json!(null)
        );
        assert_eq!(
            eval(json!({"starts_with": ["abc"]}), json!({})),
            json!(null)
        );
    }
}
