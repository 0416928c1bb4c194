//! Causal scaled-dot-product attention for MHA, GQA and MQA over a paged KV cache: each
//! sequence's positions live in fixed-size blocks named by its block table.

use rayon::prelude::*;

pub(crate) use super::attention_check::{check_batch, PoolShape};
use super::attention_rows::{key_scores, weighted_values};
#[cfg(target_arch = "x86_64")]
use super::attention_tile;
use super::elementwise::softmax_inplace;
use super::matmul::OutPtr;
use super::widen::{widen, Half};
use crate::Result;

/// Head layout of one attention layer. Query head `h` reads KV head `h / (n_heads / n_kv_heads)`.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Sliding-window attention: a query at position `i` sees keys `i + 1 - window ..= i`
    /// (transformers' `sliding_window`); `None` sees every earlier key.
    pub window: Option<usize>,
    /// Logit soft-capping (Gemma 2): each scaled score `s` becomes `cap · tanh(s / cap)`.
    pub softcap: Option<f32>,
}

impl AttentionShape {
    /// The first key position seen by a query that sees `n` keys without a window.
    pub fn first_key(&self, n: usize) -> usize {
        self.window.map_or(0, |w| n.saturating_sub(w))
    }

    /// Soft-caps scores in place, where the shape has a cap.
    pub(super) fn cap(&self, scores: &mut [f32]) {
        if let Some(cap) = self.softcap {
            for s in scores {
                *s = cap * (*s / cap).tanh();
            }
        }
    }
}

/// The parts of a block table's blocks that hold positions `lo..n`: each as (its first
/// position, (its first pool slot, its length)).
pub(super) fn spans(
    blocks: &[u32],
    block_size: usize,
    (lo, n): (usize, usize),
) -> impl Iterator<Item = (usize, (usize, usize))> + Clone + '_ {
    (lo / block_size..n.div_ceil(block_size)).map(move |i| {
        let start = (i * block_size).max(lo);
        let end = ((i + 1) * block_size).min(n);
        (
            start,
            (
                blocks[i] as usize * block_size + start - i * block_size,
                end - start,
            ),
        )
    })
}

/// One layer's key and value pools, `[num_blocks × block_size × n_kv_heads × head_dim]` each.
#[derive(Clone, Copy, Debug)]
pub struct PagedKv<'a> {
    pub k: KvData<'a>,
    pub v: KvData<'a>,
    pub block_size: usize,
}

/// How a pool stores its values. Quantized pools keep one f32 scale per (slot, KV head):
/// `scales[slot · n_kv_heads + head]`, value = `code · scale`; 16-bit pools hold bf16 or f16
/// bit patterns.
#[derive(Clone, Copy, Debug)]
pub enum KvData<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
    Int8 { q: &'a [i8], scales: &'a [f32] },
    Fp8 { q: &'a [u8], scales: &'a [f32] },
}

impl KvData<'_> {
    fn len(&self) -> usize {
        match self {
            KvData::F32(d) => d.len(),
            KvData::Bf16(d) | KvData::F16(d) => d.len(),
            KvData::Int8 { q, .. } => q.len(),
            KvData::Fp8 { q, .. } => q.len(),
        }
    }

    fn scales_len(&self) -> Option<usize> {
        match self {
            KvData::F32(_) | KvData::Bf16(_) | KvData::F16(_) => None,
            KvData::Int8 { scales, .. } | KvData::Fp8 { scales, .. } => Some(scales.len()),
        }
    }

    /// Rows `slot0..slot0 + n` of head `head` as f32 rows `stride` apart: the pool itself for
    /// f32, else widened or dequantized into `buf`.
    pub(super) fn head_rows<'b>(
        &'b self,
        (slot0, n): (usize, usize),
        (head, head_dim, n_kv_heads): (usize, usize, usize),
        buf: &'b mut Vec<f32>,
    ) -> (&'b [f32], usize) {
        let kv_row = n_kv_heads * head_dim;
        let base = |slot: usize| slot * kv_row + head * head_dim;
        let slots = slot0..slot0 + n;
        let scale = |scales: &[f32], slot: usize| scales[slot * n_kv_heads + head];
        match self {
            KvData::F32(d) => (&d[base(slot0)..], kv_row),
            KvData::Bf16(d) => gather(buf, slots, head_dim, |slot, out| {
                widen(Half::Bf16, &d[base(slot)..][..head_dim], out)
            }),
            KvData::F16(d) => gather(buf, slots, head_dim, |slot, out| {
                widen(Half::F16, &d[base(slot)..][..head_dim], out)
            }),
            KvData::Int8 { q, scales } => gather(buf, slots, head_dim, |slot, out| {
                let s = scale(scales, slot);
                for (o, &c) in out.iter_mut().zip(&q[base(slot)..]) {
                    *o = c as f32 * s;
                }
            }),
            KvData::Fp8 { q, scales } => gather(buf, slots, head_dim, |slot, out| {
                let s = scale(scales, slot);
                for (o, &c) in out.iter_mut().zip(&q[base(slot)..]) {
                    *o = super::e4m3_to_f32(c) * s;
                }
            }),
        }
    }
}

/// `head_dim` floats per slot written by `row(slot, out)` into `buf`, as rows `head_dim` apart.
fn gather(
    buf: &mut Vec<f32>,
    slots: std::ops::Range<usize>,
    head_dim: usize,
    mut row: impl FnMut(usize, &mut [f32]),
) -> (&[f32], usize) {
    buf.resize(slots.len() * head_dim, 0.0);
    for (slot, out) in slots.zip(buf.chunks_exact_mut(head_dim)) {
        row(slot, out);
    }
    (&buf[..], head_dim)
}

/// One sequence of a batched attention call: `n_new` query rows at positions
/// `past..past + n_new`, whose keys and values (including the new ones) sit in `blocks`.
#[derive(Clone, Copy, Debug)]
pub struct AttentionSeq<'a> {
    pub blocks: &'a [u32],
    pub past: usize,
    pub n_new: usize,
}

/// Which kernels attention may take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionPath {
    /// Prefill rows in tiles that share key reads, decode rows one per task.
    #[default]
    Fastest,
    /// Every row on its own (one summation order per row, whatever its chunk): batch
    /// invariance.
    Rows,
}

/// `q` holds every sequence's new rows back to back, `[Σ n_new × n_heads × head_dim]`; row `t`
/// of a sequence attends to its positions `0..=past + t`. Writes `out` in the layout of `q`.
pub fn paged_attention(
    q: &[f32],
    kv: PagedKv<'_>,
    seqs: &[AttentionSeq<'_>],
    shape: AttentionShape,
    out: &mut [f32],
) -> Result<()> {
    paged_attention_with(q, kv, (seqs, shape), out, AttentionPath::Fastest)
}

/// [`paged_attention`] on the kernels `path` allows.
pub fn paged_attention_with(
    q: &[f32],
    kv: PagedKv<'_>,
    (seqs, shape): (&[AttentionSeq<'_>], AttentionShape),
    out: &mut [f32],
    path: AttentionPath,
) -> Result<()> {
    check_batch(
        (q.len(), out.len()),
        PoolShape {
            k: kv.k.len(),
            v: kv.v.len(),
            k_scales: kv.k.scales_len(),
            v_scales: kv.v.scales_len(),
            block_size: kv.block_size,
        },
        seqs,
        shape,
    )?;
    let isa = super::simd::isa();
    let out_ptr = OutPtr(out.as_mut_ptr());
    plan(seqs, shape, (isa, path))
        .par_iter()
        .for_each_init(Scratch::default, |sc, work| {
            let base = out_ptr.get();
            match work {
                // SAFETY: `plan` gives every (row, head) slot of `out` to exactly one work item.
                Work::Row { seq, t, first } => {
                    let n = (shape.n_heads / shape.n_kv_heads) * shape.head_dim;
                    let hd = shape.head_dim;
                    let o = unsafe { std::slice::from_raw_parts_mut(base.add(first * hd), n) };
                    row_group(q, kv, (&seqs[*seq], *t, *first), shape, o, &mut sc.row);
                }
                // SAFETY: as above; tiles exist only where `isa` is AVX2 or better, and the
                // batch passed `check_batch`.
                #[cfg(target_arch = "x86_64")]
                Work::Tile(tile) => unsafe {
                    attention_tile::run(isa, (q, base), kv, shape, (&seqs[tile.seq], tile), sc)
                },
            }
        });
    Ok(())
}

/// What one task computes.
enum Work {
    /// The queries `first..first + group` (`row · n_heads + head`) of the sequence's new row
    /// `t`: the heads of one KV head.
    Row { seq: usize, t: usize, first: usize },
    #[cfg(target_arch = "x86_64")]
    Tile(attention_tile::Tile),
}

#[cfg(target_arch = "x86_64")]
type Scratch = attention_tile::Scratch;

#[cfg(not(target_arch = "x86_64"))]
#[derive(Default)]
struct Scratch {
    row: RowScratch,
}

/// Sequences whose new rows fill at least a vector of queries per KV head (prefill) go in
/// tiles; the others (decode) one query per task.
fn plan(
    seqs: &[AttentionSeq<'_>],
    shape: AttentionShape,
    (isa, path): (super::simd::Isa, AttentionPath),
) -> Vec<Work> {
    let group = shape.n_heads / shape.n_kv_heads;
    let mut work = Vec::new();
    let mut row0 = 0;
    for (seq, s) in seqs.iter().enumerate() {
        let per_kv_head = s.n_new * group;
        #[cfg(target_arch = "x86_64")]
        let tiled = path == AttentionPath::Fastest
            && isa >= super::simd::Isa::Avx2
            && per_kv_head >= attention_tile::min_queries(isa);
        #[cfg(not(target_arch = "x86_64"))]
        let tiled = {
            let _ = (isa, path, per_kv_head); // no SIMD tiles off x86
            false
        };
        if tiled {
            #[cfg(target_arch = "x86_64")]
            for kv_head in 0..shape.n_kv_heads {
                let lanes = attention_tile::tile_lanes(isa);
                for j0 in (0..per_kv_head).step_by(lanes) {
                    let js = j0..(j0 + lanes).min(per_kv_head);
                    work.push(Work::Tile(attention_tile::Tile {
                        seq,
                        row0,
                        kv_head,
                        js,
                    }));
                }
            }
        } else {
            for t in 0..s.n_new {
                for kv_head in 0..shape.n_kv_heads {
                    let first = (row0 + t) * shape.n_heads + kv_head * group;
                    work.push(Work::Row { seq, t, first });
                }
            }
        }
        row0 += s.n_new;
    }
    work
}

/// A row's queries that read one KV head, against their sequence's keys: a row of scores per
/// query, its softmax, the weighted values, written to `o` (`group × head_dim`).
fn row_group(
    q: &[f32],
    kv: PagedKv<'_>,
    (s, t, first): (&AttentionSeq<'_>, usize, usize),
    shape: AttentionShape,
    o: &mut [f32],
    sc: &mut RowScratch,
) {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim: hd,
        scale,
        ..
    } = shape;
    let group = n_heads / n_kv_heads;
    let kvh = first % n_heads / group;
    let qs = (&q[first * hd..(first + group) * hd], hd);
    let n = s.past + t + 1;
    let lo = shape.first_key(n);
    let m = n - lo;
    let head = (kvh, hd, n_kv_heads);
    let spans = spans(s.blocks, kv.block_size, (lo, n));
    sc.scores.resize(group * m, 0.0);
    for (p, slots) in spans.clone() {
        let (keys, stride) = kv.k.head_rows(slots, head, &mut sc.widened);
        key_scores(
            qs,
            (keys, stride),
            scale,
            (&mut sc.scores[p - lo..], m),
            slots.1,
        );
    }
    for row in sc.scores.chunks_exact_mut(m) {
        shape.cap(row);
        softmax_inplace(row);
    }
    o.fill(0.0);
    for (p, slots) in spans {
        let (values, stride) = kv.v.head_rows(slots, head, &mut sc.widened);
        weighted_values(
            (&sc.scores[p - lo..], m),
            (values, stride),
            slots.1,
            (o, hd),
        );
    }
}

/// The row path's buffers, reused across rows.
#[derive(Default)]
pub(super) struct RowScratch {
    scores: Vec<f32>,
    widened: Vec<f32>,
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
