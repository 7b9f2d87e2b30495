//! flagd's `fractional` operator, as its current specification buckets (flagd's ADR
//! "fractional-non-string-rand-units", implemented by the reference core `openfeature-flagd-core`
//! 2.0 and tested by flagd-testbed 3.9's `@fractional-v3` cases): the bucketing value is encoded
//! as deterministic CBOR (RFC 8949 §4.2.1, numbers that are whole first made integers), hashed
//! with MurmurHash3 x86_32 (seed 0), and `(hash × total weight) >> 32` picks the bucket through
//! the variants' cumulative integer weights, in the order listed. The default bucketing value is
//! the pair `[flagKey, targetingKey]`. (Older flagd releases hashed the string
//! `flagKey + targetingKey`, and gave different buckets.)

use serde_json::Value;

/// The largest sum of weights (flagd's, an i32's largest value).
const MAX_TOTAL_WEIGHT: u64 = i32::MAX as u64;

/// Evaluates `fractional` on its evaluated arguments; `flag_key` and `targeting_key` make the
/// default bucketing value. None (JSON null) on any bad input, as flagd's custom operators do.
pub fn fractional(args: &[Value], flag_key: &str, targeting_key: Option<&str>) -> Option<Value> {
    let (first, rest) = args.split_first()?;
    let (hash, buckets) = match first {
        // The shorthand: every argument is a bucket, and the user is the bucketing value.
        Value::Array(_) => {
            let key = targeting_key.filter(|k| !k.is_empty())?;
            (pair_hash(flag_key, key), args)
        }
        Value::Null => return None,
        value => {
            let mut encoded = Vec::new();
            cbor(&normalized(value), &mut encoded);
            (murmur3_32(&encoded, 0), rest)
        }
    };
    // Checked whole before any is chosen: one bad bucket makes the operation null.
    if buckets.iter().any(|b| bucket(b).is_none()) {
        return None;
    }
    let weights = buckets.iter().filter_map(bucket).map(|(_, weight)| weight);
    let chosen = bucket_of(hash, weights)?;
    bucket(&buckets[chosen]).map(|(variant, _)| variant.clone())
}

/// The hash `fractional` gives the pair `[first, second]`, its default bucketing value
/// (`[flagKey, targetingKey]`), encoded without building the pair: the mesh's sticky splits
/// bucket a request's key, salted with its route, the same way.
pub fn pair_hash(first: &str, second: &str) -> u32 {
    // Encoded on the stack when it fits, as a request's key and a flag's do.
    const ON_STACK: usize = 256;
    let len = 1 + 9 + first.len() + 9 + second.len();
    let mut stack = [0u8; ON_STACK];
    let mut heap = Vec::new();
    let mut at = 0;
    let out: &mut [u8] = if len <= ON_STACK {
        &mut stack
    } else {
        heap.resize(len, 0);
        &mut heap
    };
    out[0] = 0x82;
    at += 1;
    for text in [first, second] {
        let (text_head, head_len) = head_bytes(3, text.len() as u64);
        out[at..at + head_len].copy_from_slice(&text_head[..head_len]);
        at += head_len;
        out[at..at + text.len()].copy_from_slice(text.as_bytes());
        at += text.len();
    }
    murmur3_32(&out[..at], 0)
}

/// Which of the weighted buckets, in order, `hash` falls in: `(hash × total) >> 32` through
/// their cumulative weights. None when the weights are all 0 or sum past flagd's bound.
pub fn bucket_of(hash: u32, weights: impl Iterator<Item = u64> + Clone) -> Option<usize> {
    let total: u64 = weights.clone().sum();
    if total == 0 || total > MAX_TOTAL_WEIGHT {
        return None;
    }
    let point = (u64::from(hash) * total) >> 32;
    let mut end = 0;
    weights.enumerate().find_map(|(i, weight)| {
        end += weight;
        (point < end).then_some(i)
    })
}

/// One bucket: `[variant]` (weight 1) or `[variant, weight]`, the weight a JSON integer
/// (negative counts as 0). A weight written with a fraction, even `25.0`, is refused, as the
/// reference core refuses it.
fn bucket(entry: &Value) -> Option<(&Value, u64)> {
    match entry.as_array()?.as_slice() {
        [variant] => Some((variant, 1)),
        [variant, Value::Number(weight)] => {
            let weight = weight.as_u64().or_else(|| weight.as_i64().map(|_| 0))?;
            Some((variant, weight))
        }
        _ => None,
    }
}

/// The value with every whole float in the range of 64-bit integers made an integer, so that
/// `1.0` and `1` bucket alike.
fn normalized(value: &Value) -> Value {
    match value {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            let in_range =
                (-9_223_372_036_854_775_808.0..18_446_744_073_709_551_616.0).contains(&f);
            if f.fract() == 0.0 && in_range {
                if f < 0.0 {
                    Value::from(f as i64)
                } else {
                    Value::from(f as u64)
                }
            } else {
                value.clone()
            }
        }
        Value::Array(items) => Value::Array(items.iter().map(normalized).collect()),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), normalized(v)))
                .collect(),
        ),
        _ => value.clone(),
    }
}

/// Deterministic CBOR: the shortest heads, the shortest float that holds the value exactly,
/// and map keys in the order of their encoded bytes.
fn cbor(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.push(0xf6),
        Value::Bool(false) => out.push(0xf4),
        Value::Bool(true) => out.push(0xf5),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                head(0, u, out);
            } else if let Some(i) = n.as_i64() {
                // Negative: major type 1 carries -1 - i.
                head(1, (-1 - i128::from(i)) as u64, out);
            } else {
                float(n.as_f64().unwrap_or(f64::NAN), out);
            }
        }
        Value::String(s) => {
            head(3, s.len() as u64, out);
            out.extend_from_slice(s.as_bytes());
        }
        Value::Array(items) => {
            head(4, items.len() as u64, out);
            for item in items {
                cbor(item, out);
            }
        }
        Value::Object(fields) => {
            let mut pairs: Vec<(Vec<u8>, &Value)> = fields
                .iter()
                .map(|(k, v)| {
                    let mut key = Vec::new();
                    cbor(&Value::String(k.clone()), &mut key);
                    (key, v)
                })
                .collect();
            pairs.sort_by(|a, b| a.0.cmp(&b.0));
            head(5, pairs.len() as u64, out);
            for (key, v) in pairs {
                out.extend_from_slice(&key);
                cbor(v, out);
            }
        }
    }
}

fn head(major: u8, n: u64, out: &mut Vec<u8>) {
    let (bytes, len) = head_bytes(major, n);
    out.extend_from_slice(&bytes[..len]);
}

/// A CBOR head, shortest form: the bytes, and how many of them it takes.
fn head_bytes(major: u8, n: u64) -> ([u8; 9], usize) {
    let major = major << 5;
    let mut bytes = [0u8; 9];
    let len = match n {
        0..=23 => {
            bytes[0] = major | n as u8;
            1
        }
        24..=0xff => {
            bytes[..2].copy_from_slice(&[major | 24, n as u8]);
            2
        }
        0x100..=0xffff => {
            bytes[0] = major | 25;
            bytes[1..3].copy_from_slice(&(n as u16).to_be_bytes());
            3
        }
        0x1_0000..=0xffff_ffff => {
            bytes[0] = major | 26;
            bytes[1..5].copy_from_slice(&(n as u32).to_be_bytes());
            5
        }
        _ => {
            bytes[0] = major | 27;
            bytes[1..9].copy_from_slice(&n.to_be_bytes());
            9
        }
    };
    (bytes, len)
}

fn float(f: f64, out: &mut Vec<u8>) {
    if let Some(half) = f16_exact(f) {
        out.push(0xf9);
        out.extend_from_slice(&half.to_be_bytes());
    } else if f64::from(f as f32) == f {
        out.push(0xfa);
        out.extend_from_slice(&(f as f32).to_bits().to_be_bytes());
    } else {
        out.push(0xfb);
        out.extend_from_slice(&f.to_bits().to_be_bytes());
    }
}

/// The half-precision bits of `f` when a half holds it exactly (subnormals included).
fn f16_exact(f: f64) -> Option<u16> {
    if !f.is_finite() {
        return None;
    }
    let sign = if f.is_sign_negative() { 0x8000 } else { 0 };
    let a = f.abs();
    if a == 0.0 {
        return Some(sign);
    }
    // Subnormal: k × 2^-24 with k from 1 to 1023.
    let k = a * 2f64.powi(24);
    if k.fract() == 0.0 && (1.0..1024.0).contains(&k) {
        return Some(sign | k as u16);
    }
    // Normal: (1024 + fraction) × 2^(e - 25), e from 1 to 30.
    (1..=30).find_map(|e: i32| {
        let m = a / 2f64.powi(e - 25);
        (m.fract() == 0.0 && (1024.0..2048.0).contains(&m))
            .then(|| sign | ((e as u16) << 10) | (m as u16 - 1024))
    })
}

/// MurmurHash3, x86 32-bit.
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mix = |k: u32| k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    let mut h = seed;
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        h = (h ^ mix(k))
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64);
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let k = tail
            .iter()
            .rev()
            .fold(0u32, |k, &byte| (k << 8) | u32::from(byte));
        h ^= mix(k);
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn encoded(value: &Value) -> String {
        let mut out = Vec::new();
        cbor(&normalized(value), &mut out);
        hex(&out)
    }

    #[test]
    fn murmur3_gives_the_reference_hashes() {
        assert_eq!(murmur3_32(b"", 0), 0);
        assert_eq!(murmur3_32(b"hello", 0), 0x248b_fa47);
        assert_eq!(murmur3_32(b"foo", 0), 0xf6a5_c420);
        assert_eq!(murmur3_32(b"a", 0), 0x3c25_69b2);
    }

    #[test]
    fn values_encode_as_deterministic_cbor() {
        assert_eq!(encoded(&json!(true)), "f5");
        assert_eq!(encoded(&json!(1.23)), "fb3ff3ae147ae147ae");
        assert_eq!(encoded(&json!(1.0)), encoded(&json!(1)));
        assert_eq!(encoded(&json!(-0.0)), "00");
        assert_eq!(encoded(&json!(1.5)), "f93e00");
        assert_eq!(encoded(&json!(-24)), "37");
        assert_eq!(encoded(&json!(-25)), "3818");
        assert_eq!(encoded(&json!(u64::MAX)), "1bffffffffffffffff");
        assert_eq!(
            encoded(&json!(["fractional-flag-shorthand", "user-1"])),
            "8278196672616374696f6e616c2d666c61672d73686f727468616e6466757365722d31"
        );
        // Keys in the order of their encodings: shorter first.
        assert_eq!(encoded(&json!({"bb": 1, "a": 2})), "a261610262626201");
    }

    /// The reference core's vectors (flagd-testbed's `@fractional-v3` values, computed by
    /// `openfeature-flagd-core` 2.0): the encoding, its hash and the bucket of each.
    #[test]
    fn the_reference_vectors_bucket_alike() {
        let vectors: Vec<Value> =
            serde_json::from_str(include_str!("../tests/testbed/fractional-vectors.json")).unwrap();
        let mut checked = 0;
        for v in vectors.iter().filter(|v| v["version"] == "v3") {
            let mut out = Vec::new();
            cbor(&normalized(&v["bucketing_value"]), &mut out);
            assert_eq!(hex(&out), v["hashed_bytes_hex"], "{v}");
            let hash = murmur3_32(&out, 0);
            assert_eq!(u64::from(hash), v["murmur3_x86_32"], "{v}");
            let total = v["total_weight"].as_u64().unwrap();
            assert_eq!((u64::from(hash) * total) >> 32, v["bucket"], "{v}");
            checked += 1;
        }
        assert!(checked > 100, "{checked} vectors");
    }

    #[test]
    fn a_pair_hashes_as_fractional_hashes_it() {
        for (a, b) in [
            ("f", "u"),
            ("", "🦜"),
            ("default/reviews", &"k".repeat(300) as &str),
        ] {
            let mut out = Vec::new();
            cbor(&json!([a, b]), &mut out);
            assert_eq!(pair_hash(a, b), murmur3_32(&out, 0));
        }
    }

    #[test]
    fn buckets_follow_the_weights_in_order() {
        let args = [json!("x"), json!(["a", 0]), json!(["b"])];
        assert_eq!(fractional(&args, "f", None), Some(json!("b")));
        // All weights 0, a fractional weight, a null bucketing value: no answer.
        assert_eq!(fractional(&[json!("x"), json!(["a", 0])], "f", None), None);
        assert_eq!(
            fractional(&[json!("x"), json!(["a", 0.5])], "f", None),
            None
        );
        assert_eq!(fractional(&[json!(null), json!(["a"])], "f", None), None);
        // The shorthand needs a targeting key.
        assert_eq!(fractional(&[json!(["a"])], "f", None), None);
        assert_eq!(
            fractional(&[json!(["a"])], "f", Some("u")),
            Some(json!("a"))
        );
    }
}
