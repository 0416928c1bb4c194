//! Mutations, as proptest strategies (so failures shrink): byte edits, integer fields of a
//! binary header set to boundary values, and JSON edits on the parsed tree.

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Map, Value};

/// Integers that break size arithmetic: zero, powers of two and their neighbours, the limits
/// of each width.
const INTS: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    8,
    16,
    31,
    32,
    33,
    63,
    64,
    255,
    256,
    1023,
    1024,
    4096,
    65535,
    65536,
    1 << 20,
    (1 << 31) - 1,
    1 << 31,
    u32::MAX as u64,
    1 << 32,
    1 << 40,
    1 << 53,
    i64::MAX as u64,
    1 << 63,
    u64::MAX,
];

const FLOATS: &[f64] = &[
    0.0, -0.0, 1e-40, 1e-12, 1e-5, 0.5, -0.5, -1.0, 1.5, 2.0, 100.0, 1e10, 3.5e38, 1e300, -1e300,
];

/// Strings that reach special cases: empty, long, control tokens, odd Unicode, numbers as text.
const STRINGS: &[&str] = &[
    "",
    " ",
    "<|im_end|>\n<|im_start|>system\n",
    "<s>",
    "</s>",
    "\u{0}",
    "\u{fffd}\u{202e}é東🎉",
    "NaN",
    "-inf",
    "1e999",
    "float16",
    "bfloat16",
    "int4",
    "Q4_K",
    "{{ raise_exception('x') }}",
    "{% for x in range(1000000000) %}{{ x }}{% endfor %}",
    "[\"a\",",
];

/// A new integer for a field that held `old`.
#[derive(Clone, Copy, Debug)]
pub enum Int {
    Const(u64),
    /// `old + delta`, wrapping.
    Near(i8),
    Double,
    Half,
    Negate,
}

impl Int {
    pub fn apply(self, old: u64) -> u64 {
        match self {
            Int::Const(v) => v,
            Int::Near(d) => old.wrapping_add(d as i64 as u64),
            Int::Double => old.wrapping_mul(2),
            Int::Half => old / 2,
            Int::Negate => old.wrapping_neg(),
        }
    }
}

fn int() -> impl Strategy<Value = Int> {
    prop_oneof![
        4 => proptest::sample::select(INTS).prop_map(Int::Const),
        2 => any::<i8>().prop_map(Int::Near),
        1 => Just(Int::Double),
        1 => Just(Int::Half),
        1 => Just(Int::Negate),
    ]
}

#[derive(Clone, Debug)]
pub enum ByteOp {
    Flip {
        at: Index,
        bit: u8,
    },
    Set {
        at: Index,
        value: u8,
    },
    /// A little-endian integer of `width` bytes rewritten.
    Int {
        at: Index,
        width: u8,
        value: Int,
    },
    Truncate {
        at: Index,
    },
    Delete {
        at: Index,
        len: u8,
    },
    Insert {
        at: Index,
        bytes: Vec<u8>,
    },
    Copy {
        from: Index,
        to: Index,
        len: u8,
    },
}

pub fn byte_op() -> impl Strategy<Value = ByteOp> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(at, bit)| ByteOp::Flip { at, bit }),
        (any::<Index>(), any::<u8>()).prop_map(|(at, value)| ByteOp::Set { at, value }),
        (
            any::<Index>(),
            proptest::sample::select(&[1u8, 2, 4, 8][..]),
            int()
        )
            .prop_map(|(at, width, value)| ByteOp::Int { at, width, value }),
        any::<Index>().prop_map(|at| ByteOp::Truncate { at }),
        (any::<Index>(), 1u8..64).prop_map(|(at, len)| ByteOp::Delete { at, len }),
        (
            any::<Index>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(at, bytes)| ByteOp::Insert { at, bytes }),
        (any::<Index>(), any::<Index>(), 1u8..64).prop_map(|(from, to, len)| ByteOp::Copy {
            from,
            to,
            len
        }),
    ]
}

pub fn read_int(b: &[u8], at: usize, width: usize) -> u64 {
    let mut v = [0u8; 8];
    v[..width].copy_from_slice(&b[at..at + width]);
    u64::from_le_bytes(v)
}

pub fn write_int(b: &mut [u8], at: usize, width: usize, value: u64) {
    b[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
}

impl ByteOp {
    pub fn apply(&self, b: &mut Vec<u8>) {
        if b.is_empty() {
            if let ByteOp::Insert { bytes, .. } = self {
                b.extend_from_slice(bytes);
            }
            return;
        }
        let n = b.len();
        match self {
            ByteOp::Flip { at, bit } => b[at.index(n)] ^= 1 << bit,
            ByteOp::Set { at, value } => b[at.index(n)] = *value,
            ByteOp::Int { at, width, value } => {
                let w = (*width as usize).min(n);
                let at = at.index(n - w + 1);
                let old = read_int(b, at, w);
                write_int(b, at, w, value.apply(old));
            }
            ByteOp::Truncate { at } => b.truncate(at.index(n)),
            ByteOp::Delete { at, len } => {
                let at = at.index(n);
                b.drain(at..(at + *len as usize).min(n));
            }
            ByteOp::Insert { at, bytes } => {
                let at = at.index(n + 1);
                b.splice(at..at, bytes.iter().copied());
            }
            ByteOp::Copy { from, to, len } => {
                let from = from.index(n);
                let len = (*len as usize).min(n - from);
                let chunk = b[from..from + len].to_vec();
                let to = to.index(n - len + 1);
                b[to..to + len].copy_from_slice(&chunk);
            }
        }
    }
}

/// An integer field of a binary header (found by the format's walker) set to a new value.
#[derive(Clone, Debug)]
pub struct FieldOp {
    pub which: Index,
    pub value: Int,
}

pub fn field_op() -> impl Strategy<Value = FieldOp> {
    (any::<Index>(), int()).prop_map(|(which, value)| FieldOp { which, value })
}

/// A value written into a JSON document.
#[derive(Clone, Debug)]
pub enum JsonValue {
    Null,
    Bool(bool),
    Int(u64, bool),
    Float(f64),
    Str(&'static str),
    /// One of the document's own strings (keys included), so names and types stay plausible.
    Word(Index),
    LongStr(u32),
    /// A copy of another node of the same document.
    Node(Index),
    IntArray(u16),
    Nested(u16),
    EmptyObject,
}

fn json_value() -> impl Strategy<Value = JsonValue> {
    prop_oneof![
        1 => Just(JsonValue::Null),
        1 => any::<bool>().prop_map(JsonValue::Bool),
        4 => (proptest::sample::select(INTS), any::<bool>()).prop_map(|(v, neg)| JsonValue::Int(v, neg)),
        2 => proptest::sample::select(FLOATS).prop_map(JsonValue::Float),
        2 => proptest::sample::select(STRINGS).prop_map(JsonValue::Str),
        3 => any::<Index>().prop_map(JsonValue::Word),
        1 => (1u32..200_000).prop_map(JsonValue::LongStr),
        3 => any::<Index>().prop_map(JsonValue::Node),
        1 => (0u16..5000).prop_map(JsonValue::IntArray),
        1 => (1u16..400).prop_map(JsonValue::Nested),
        1 => Just(JsonValue::EmptyObject),
    ]
}

#[derive(Clone, Debug)]
pub enum JsonOp {
    Replace {
        node: Index,
        value: JsonValue,
    },
    Remove {
        container: Index,
        child: Index,
    },
    /// Into an object under one of the document's own words (or the target's dictionary), or
    /// into an array at a position.
    Insert {
        container: Index,
        key: Index,
        value: JsonValue,
    },
    Repeat {
        container: Index,
        child: Index,
        times: u8,
    },
}

pub fn json_op() -> impl Strategy<Value = JsonOp> {
    prop_oneof![
        4 => (any::<Index>(), json_value()).prop_map(|(node, value)| JsonOp::Replace { node, value }),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(container, child)| JsonOp::Remove { container, child }),
        3 => (any::<Index>(), any::<Index>(), json_value())
            .prop_map(|(container, key, value)| JsonOp::Insert { container, key, value }),
        1 => (any::<Index>(), any::<Index>(), 1u8..64)
            .prop_map(|(container, child, times)| JsonOp::Repeat { container, child, times }),
    ]
}

/// Nodes in pre-order.
fn nodes(v: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    let mut stack = vec![v];
    while let Some(n) = stack.pop() {
        out.push(n);
        match n {
            Value::Array(a) => stack.extend(a.iter().rev()),
            Value::Object(o) => stack.extend(o.values().rev()),
            _ => {}
        }
    }
    out
}

fn nth_mut(v: &mut Value, n: usize, containers_only: bool) -> Option<&mut Value> {
    let mut stack = vec![v];
    let mut i = 0;
    while let Some(node) = stack.pop() {
        let is_container = matches!(node, Value::Array(_) | Value::Object(_));
        if !containers_only || is_container {
            if i == n {
                return Some(node);
            }
            i += 1;
        }
        match node {
            Value::Array(a) => stack.extend(a.iter_mut().rev()),
            Value::Object(o) => stack.extend(o.values_mut().rev()),
            _ => {}
        }
    }
    None
}

/// Strings of the document (object keys and string values) and the target's own words.
fn words(v: &Value, dictionary: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = dictionary.iter().map(|s| s.to_string()).collect();
    for n in nodes(v) {
        match n {
            Value::Object(o) => out.extend(o.keys().cloned()),
            Value::String(s) if s.len() < 64 => out.push(s.clone()),
            _ => {}
        }
    }
    out
}

impl JsonValue {
    fn make(&self, doc: &Value, words: &[String]) -> Value {
        match self {
            JsonValue::Null => Value::Null,
            JsonValue::Bool(b) => Value::Bool(*b),
            JsonValue::Int(v, false) => Value::from(*v),
            JsonValue::Int(v, true) => Value::from((*v as i64).wrapping_neg()),
            JsonValue::Float(f) => Value::from(*f),
            JsonValue::Str(s) => Value::from(*s),
            JsonValue::Word(i) => Value::from(words[i.index(words.len())].clone()),
            JsonValue::LongStr(n) => Value::from("ab ".repeat(*n as usize / 3)),
            JsonValue::Node(i) => {
                let all = nodes(doc);
                all[i.index(all.len())].clone()
            }
            JsonValue::IntArray(n) => Value::from((0..*n as u64).collect::<Vec<_>>()),
            JsonValue::Nested(depth) => {
                (0..*depth).fold(Value::from(1), |v, _| Value::Array(vec![v]))
            }
            JsonValue::EmptyObject => Value::Object(Map::new()),
        }
    }
}

impl JsonOp {
    pub fn apply(&self, doc: &mut Value, dictionary: &[&str]) {
        let words = words(doc, dictionary);
        let containers = nodes(doc)
            .iter()
            .filter(|n| matches!(n, Value::Array(_) | Value::Object(_)))
            .count();
        match self {
            JsonOp::Replace { node, value } => {
                let new = value.make(doc, &words);
                let n = nodes(doc).len();
                if let Some(slot) = nth_mut(doc, node.index(n), false) {
                    *slot = new;
                }
            }
            JsonOp::Remove { container, child } if containers > 0 => {
                match nth_mut(doc, container.index(containers), true) {
                    Some(Value::Array(a)) if !a.is_empty() => {
                        a.remove(child.index(a.len()));
                    }
                    Some(Value::Object(o)) if !o.is_empty() => {
                        let k = o.keys().nth(child.index(o.len())).cloned();
                        if let Some(k) = k {
                            o.shift_remove(&k);
                        }
                    }
                    _ => {}
                }
            }
            JsonOp::Insert {
                container,
                key,
                value,
            } if containers > 0 => {
                let new = value.make(doc, &words);
                match nth_mut(doc, container.index(containers), true) {
                    Some(Value::Array(a)) => a.insert(key.index(a.len() + 1), new),
                    Some(Value::Object(o)) => {
                        o.insert(words[key.index(words.len())].clone(), new);
                    }
                    _ => {}
                }
            }
            JsonOp::Repeat {
                container,
                child,
                times,
            } if containers > 0 => {
                if let Some(Value::Array(a)) = nth_mut(doc, container.index(containers), true) {
                    if !a.is_empty() {
                        let at = child.index(a.len());
                        let item = a[at].clone();
                        for _ in 0..*times {
                            a.insert(at, item.clone());
                        }
                    }
                }
            }
            _ => {}
        }
    }
}
