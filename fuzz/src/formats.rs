//! How each kind of file is mutated: JSON as a tree, GGUF through the integer fields of its
//! header, length-prefixed JSON headers (safetensors, engine rank files) as a tree whose length
//! prefix follows it, then byte edits on the result.

use serde_json::Value;

use crate::mutate::{read_int, write_int, ByteOp, FieldOp, JsonOp};

#[derive(Clone, Copy, Debug)]
pub enum FileKind {
    /// JSON; `dictionary` holds names worth inserting (the target's known fields).
    Json { dictionary: &'static [&'static str] },
    /// GGUF v2/v3: counts, lengths, types, dimensions and offsets of the header are fields.
    Gguf,
    /// A little-endian u64 length at `len_at`, that many bytes of JSON from `json_at`, the data
    /// from the next multiple of `align`; `fields` are other integers of the prefix.
    LenPrefixedJson {
        len_at: usize,
        json_at: usize,
        align: usize,
        fields: &'static [(usize, usize)],
        dictionary: &'static [&'static str],
    },
}

/// What one case does to one file.
#[derive(Clone, Debug, Default)]
pub struct Edits {
    pub json: Vec<JsonOp>,
    pub fields: Vec<FieldOp>,
    pub bytes: Vec<ByteOp>,
}

impl FileKind {
    pub fn mutate(&self, original: &[u8], edits: &Edits) -> Vec<u8> {
        let mut out = match *self {
            FileKind::Json { dictionary } => match serde_json::from_slice::<Value>(original) {
                Ok(mut doc) => {
                    for op in &edits.json {
                        op.apply(&mut doc, dictionary);
                    }
                    serde_json::to_vec(&doc).unwrap_or_else(|_| original.to_vec())
                }
                Err(_) => original.to_vec(),
            },
            FileKind::Gguf => {
                let mut b = original.to_vec();
                set_fields(&mut b, &gguf_fields(original), &edits.fields);
                b
            }
            FileKind::LenPrefixedJson {
                len_at,
                json_at,
                align,
                fields,
                dictionary,
            } => {
                let mut b =
                    rewrite_header(original, len_at, json_at, align, &edits.json, dictionary);
                let mut spots = vec![(len_at, 8)];
                spots.extend_from_slice(fields);
                set_fields(&mut b, &spots, &edits.fields);
                b
            }
        };
        for op in &edits.bytes {
            op.apply(&mut out);
        }
        out
    }
}

fn set_fields(b: &mut [u8], spots: &[(usize, usize)], ops: &[FieldOp]) {
    if spots.is_empty() {
        return;
    }
    for op in ops {
        let (at, width) = spots[op.which.index(spots.len())];
        if at + width <= b.len() {
            let old = read_int(b, at, width);
            write_int(b, at, width, op.value.apply(old));
        }
    }
}

/// The JSON header edited as a tree; the length prefix and the data's alignment follow it.
fn rewrite_header(
    original: &[u8],
    len_at: usize,
    json_at: usize,
    align: usize,
    ops: &[JsonOp],
    dictionary: &[&str],
) -> Vec<u8> {
    let len = original
        .get(len_at..len_at + 8)
        .map(|b| read_int(b, 0, 8) as usize);
    let Some(json_end) = len.and_then(|l| json_at.checked_add(l)) else {
        return original.to_vec();
    };
    let (Some(json), true) = (original.get(json_at..json_end), !ops.is_empty()) else {
        return original.to_vec();
    };
    let Ok(mut doc) = serde_json::from_slice::<Value>(json) else {
        return original.to_vec();
    };
    for op in ops {
        op.apply(&mut doc, dictionary);
    }
    let Ok(mut new) = serde_json::to_vec(&doc) else {
        return original.to_vec();
    };
    let data_start = json_end.next_multiple_of(align);
    if new.len() <= json.len() {
        // Pad with spaces to the old length: the data stays where it was.
        new.resize(json.len(), b' ');
    }
    let mut out = original[..json_at].to_vec();
    write_int(&mut out, len_at, 8, new.len() as u64);
    out.extend_from_slice(&new);
    out.resize(out.len().next_multiple_of(align), 0);
    out.extend_from_slice(original.get(data_start..).unwrap_or_default());
    out
}

/// Offsets and widths of the integer fields of a GGUF header (v2/v3): tensor and metadata
/// counts, key and string lengths, value types, scalar values, array types and lengths, tensor
/// name lengths, dimension counts, dimensions, types and offsets. Long arrays contribute their
/// first few elements only.
pub fn gguf_fields(b: &[u8]) -> Vec<(usize, usize)> {
    let mut w = Walker {
        b,
        at: 0,
        out: Vec::new(),
    };
    w.header();
    w.out
}

struct Walker<'a> {
    b: &'a [u8],
    at: usize,
    out: Vec<(usize, usize)>,
}

impl Walker<'_> {
    fn field(&mut self, width: usize) -> Option<u64> {
        let v = self.b.get(self.at..self.at + width)?;
        let v = read_int(v, 0, width);
        self.out.push((self.at, width));
        self.at += width;
        Some(v)
    }

    fn string(&mut self, record: bool) -> Option<()> {
        let len = if record {
            self.field(8)?
        } else {
            let v = read_int(self.b.get(self.at..self.at + 8)?, 0, 8);
            self.at += 8;
            v
        } as usize;
        self.at = self.at.checked_add(len).filter(|&e| e <= self.b.len())?;
        Some(())
    }

    fn value(&mut self, ty: u64, record: bool) -> Option<()> {
        let width = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => return self.string(record),
            9 => {
                let elem = self.field(4)?;
                let n = self.field(8)?;
                for i in 0..n {
                    self.value(elem, i < 3)?;
                }
                return Some(());
            }
            _ => return None,
        };
        if record {
            self.field(width)?;
        } else {
            self.at += width;
        }
        Some(())
    }

    fn header(&mut self) -> Option<()> {
        self.at = 8; // magic, version
        let tensors = self.field(8)?;
        let kvs = self.field(8)?;
        for _ in 0..kvs {
            self.string(true)?;
            let ty = self.field(4)?;
            self.value(ty, true)?;
        }
        for _ in 0..tensors {
            self.string(true)?;
            let dims = self.field(4)?;
            for _ in 0..dims {
                self.field(8)?;
            }
            self.field(4)?;
            self.field(8)?;
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_gguf_header_walks_to_its_tensors() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/seeds/tiny-llama.gguf");
        let b = std::fs::read(path).expect("seed");
        let fields = gguf_fields(&b);
        // 2 counts, and for each of 30 tensors at least name length, dims, type, offset.
        assert!(fields.len() > 2 + 30 * 5, "{} fields", fields.len());
    }

    #[test]
    fn a_grown_header_moves_the_data_and_its_length() {
        use proptest::strategy::{Strategy, ValueTree};
        let mut file = vec![0u8; 8];
        let json = br#"{"a":1}"#;
        write_int(&mut file, 0, 8, json.len() as u64);
        file.extend_from_slice(json);
        file.extend_from_slice(b"DATA");
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let node = proptest::prelude::any::<proptest::sample::Index>()
            .new_tree(&mut runner)
            .expect("index")
            .current();
        let ops = [JsonOp::Replace {
            node,
            value: crate::mutate::JsonValue::LongStr(300),
        }];
        let out = rewrite_header(&file, 0, 8, 1, &ops, &[]);
        let len = read_int(&out, 0, 8) as usize;
        assert!(len > json.len());
        serde_json::from_slice::<Value>(&out[8..8 + len]).expect("header is JSON");
        assert_eq!(&out[8 + len..], b"DATA");
    }
}
