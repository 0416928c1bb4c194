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
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, every_path, rand_vec};

    /// Contiguous `[len × nkv × hd]` keys/values, f64 accumulation.
    fn reference(q: &[f32], k: &[f32], v: &[f32], past: usize, s: AttentionShape) -> Vec<f32> {
        let (nh, nkv, hd) = (s.n_heads, s.n_kv_heads, s.head_dim);
        let n_new = q.len() / (nh * hd);
        let mut out = vec![0f32; q.len()];
        for t in 0..n_new {
            for h in 0..nh {
                let kvh = h * nkv / nh;
                let qv = &q[(t * nh + h) * hd..][..hd];
                let keys: Vec<usize> = (s.first_key(past + t + 1)..=past + t).collect();
                let sc: Vec<f64> = keys
                    .iter()
                    .map(|&p| {
                        let kk = &k[(p * nkv + kvh) * hd..][..hd];
                        let x = qv.iter().zip(kk).map(|(a, b)| (a * b) as f64).sum::<f64>()
                            * s.scale as f64;
                        s.softcap.map_or(x, |c| c as f64 * (x / c as f64).tanh())
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    let acc: f64 = e
                        .iter()
                        .enumerate()
                        .map(|(i, w)| w / z * v[(keys[i] * nkv + kvh) * hd + d] as f64)
                        .sum();
                    out[(t * nh + h) * hd + d] = acc as f32;
                }
            }
        }
        out
    }

    struct Case {
        past: usize,
        n_new: usize,
        k: Vec<f32>,
        v: Vec<f32>,
        q: Vec<f32>,
        blocks: Vec<u32>,
    }

    /// Sequences of odd lengths scattered over a shared pool in a shuffled block order.
    #[test]
    fn batched_paged_attention_matches_contiguous_reference() {
        let shapes = [(4, 4, 9, 3), (6, 2, 13, 4), (5, 1, 17, 5), (9, 3, 64, 32)];
        // Windows shorter than a block, across blocks, and longer than every sequence; soft caps
        // loose and tight.
        let masks = [
            (None, None),
            (Some(2), None),
            (Some(7), Some(5.0)),
            (Some(64), None),
            (None, Some(0.5)),
        ];
        for (&(nh, nkv, hd, bs), (window, softcap)) in
            shapes.iter().flat_map(|s| masks.map(|m| (s, m)))
        {
            let s = AttentionShape {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                window,
                softcap,
            };
            let kv_row = nkv * hd;
            let shapes: [(usize, usize); 5] = [(0, 5), (3, 4), (11, 1), (0, 33), (40, 1)];
            let total_blocks: usize = shapes.iter().map(|&(p, n)| (p + n).div_ceil(bs)).sum();
            // Block i of the pool goes to whoever draws it in this scrambled order.
            let mut order: Vec<u32> = (0..total_blocks as u32).collect();
            order.sort_by_key(|&b| (b * 7919) % total_blocks as u32);
            let mut pool_k = vec![f32::NAN; (total_blocks + 1) * bs * kv_row];
            let mut pool_v = pool_k.clone();
            let mut next = order.into_iter();
            let cases: Vec<Case> = shapes
                .iter()
                .enumerate()
                .map(|(i, &(past, n_new))| {
                    let len = past + n_new;
                    let k = rand_vec(len * kv_row, 10 + i as u64);
                    let v = rand_vec(len * kv_row, 20 + i as u64);
                    let blocks: Vec<u32> = next.by_ref().take(len.div_ceil(bs)).collect();
                    for p in 0..len {
                        let slot = (blocks[p / bs] as usize * bs + p % bs) * kv_row;
                        pool_k[slot..slot + kv_row].copy_from_slice(&k[p * kv_row..][..kv_row]);
                        pool_v[slot..slot + kv_row].copy_from_slice(&v[p * kv_row..][..kv_row]);
                    }
                    let q = rand_vec(n_new * nh * hd, 30 + i as u64);
                    Case {
                        past,
                        n_new,
                        k,
                        v,
                        q,
                        blocks,
                    }
                })
                .collect();
            let q: Vec<f32> = cases.iter().flat_map(|c| c.q.iter().copied()).collect();
            let expect: Vec<f32> = cases
                .iter()
                .flat_map(|c| reference(&c.q, &c.k, &c.v, c.past, s))
                .collect();
            let seqs: Vec<AttentionSeq> = cases
                .iter()
                .map(|c| AttentionSeq {
                    blocks: &c.blocks,
                    past: c.past,
                    n_new: c.n_new,
                })
                .collect();
            let kv = PagedKv {
                k: KvData::F32(&pool_k),
                v: KvData::F32(&pool_v),
                block_size: bs,
            };
            every_path(|| {
                let mut out = vec![0f32; q.len()];
                paged_attention(&q, kv, &seqs, s, &mut out).unwrap();
                assert_close(&out, &expect, 1e-5);
            });
        }
    }

    #[test]
    fn short_block_table_and_bad_block_id_are_errors() {
        let s = AttentionShape {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 2,
            scale: 1.0,
            window: None,
            softcap: None,
        };
        let pool = [0f32; 8];
        let kv = PagedKv {
            k: KvData::F32(&pool),
            v: KvData::F32(&pool),
            block_size: 2,
        };
        let mut out = [0f32; 2];
        let short = [AttentionSeq {
            blocks: &[0],
            past: 2,
            n_new: 1,
        }];
        assert!(paged_attention(&[0.0; 2], kv, &short, s, &mut out).is_err());
        let bad = [AttentionSeq {
            blocks: &[0, 2],
            past: 2,
            n_new: 1,
        }];
        assert!(paged_attention(&[0.0; 2], kv, &bad, s, &mut out).is_err());
    }
}

#[cfg(test)]
mod quantized_kv_tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, every_path, rand_vec};

    /// Codes and per-(slot, head) scales for `vals`, plus the values they stand for.
    fn quantize(vals: &[f32], head_dim: usize, fp8: bool) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
        let (mut q, mut scales, mut deq) = (Vec::new(), Vec::new(), Vec::new());
        for (i, head) in vals.chunks(head_dim).enumerate() {
            let s = 0.01 + (i % 5) as f32 * 0.003;
            scales.push(s);
            for &v in head {
                let code = if fp8 {
                    // Any finite E4M3 code: take the byte pattern of a small integer.
                    ((v.abs() * 40.0) as u8 & 0x77) | if v < 0.0 { 0x80 } else { 0 }
                } else {
                    (v * 127.0).round() as i8 as u8
                };
                q.push(code);
                let value = if fp8 {
                    crate::cpu::e4m3_to_f32(code)
                } else {
                    code as i8 as f32
                };
                deq.push(value * s);
            }
        }
        (q, scales, deq)
    }

    #[test]
    fn int8_and_fp8_pools_match_their_dequantized_f32_pool() {
        let (nh, nkv, hd, bs) = (6, 2, 16, 4);
        let s = AttentionShape {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            scale: 0.25,
            window: None,
            softcap: None,
        };
        let blocks = [2u32, 0, 3, 1];
        // 12 rows × 3 heads per KV head: the SIMD paths run tiles.
        let (past, n_new) = (4, 12);
        let pool = rand_vec(4 * bs * nkv * hd, 1);
        let q = rand_vec(n_new * nh * hd, 2);
        let seq = [AttentionSeq {
            blocks: &blocks,
            past,
            n_new,
        }];
        for fp8 in [false, true] {
            let (codes, scales, deq) = quantize(&pool, hd, fp8);
            let f = PagedKv {
                k: KvData::F32(&deq),
                v: KvData::F32(&deq),
                block_size: bs,
            };
            let mut expect = vec![0f32; q.len()];
            paged_attention(&q, f, &seq, s, &mut expect).unwrap();
            let i8s: Vec<i8> = codes.iter().map(|&c| c as i8).collect();
            let data = if fp8 {
                KvData::Fp8 {
                    q: &codes,
                    scales: &scales,
                }
            } else {
                KvData::Int8 {
                    q: &i8s,
                    scales: &scales,
                }
            };
            let kv = PagedKv {
                k: data,
                v: data,
                block_size: bs,
            };
            every_path(|| {
                let mut out = vec![0f32; q.len()];
                paged_attention(&q, kv, &seq, s, &mut out).unwrap();
                assert_close(&out, &expect, 1e-6);
            });
            let short = KvData::Int8 {
                q: &i8s,
                scales: &scales[1..],
            };
            let bad = PagedKv { k: short, ..kv };
            let mut out = vec![0f32; q.len()];
            assert!(paged_attention(&q, bad, &seq, s, &mut out).is_err());
        }
    }

    #[test]
    fn bf16_and_f16_pools_match_their_widened_f32_pool() {
        let (nh, nkv, hd, bs) = (4, 2, 24, 4);
        let s = AttentionShape {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            scale: 0.2,
            window: None,
            softcap: None,
        };
        let blocks = [1u32, 3, 0, 2];
        // 9 rows × 2 heads per KV head: tiles on the SIMD paths.
        let seq = [AttentionSeq {
            blocks: &blocks,
            past: 7,
            n_new: 9,
        }];
        let k = rand_vec(4 * bs * nkv * hd, 3);
        let v = rand_vec(4 * bs * nkv * hd, 4);
        let q = rand_vec(9 * nh * hd, 5);
        // Bit patterns of `x` in bf16 or f16, and the values they stand for.
        let round = |x: &[f32], bf16: bool| -> (Vec<u16>, Vec<f32>) {
            let bits: Vec<u16> = x
                .iter()
                .map(|&f| match bf16 {
                    true => half::bf16::from_f32(f).to_bits(),
                    false => half::f16::from_f32(f).to_bits(),
                })
                .collect();
            let widened = bits
                .iter()
                .map(|&b| match bf16 {
                    true => half::bf16::from_bits(b).to_f32(),
                    false => half::f16::from_bits(b).to_f32(),
                })
                .collect();
            (bits, widened)
        };
        let (kb, vb) = (round(&k, true), round(&v, true));
        let (kh, vh) = (round(&k, false), round(&v, false));
        let cases = [
            (KvData::Bf16(&kb.0), KvData::Bf16(&vb.0), &kb.1, &vb.1),
            (KvData::F16(&kh.0), KvData::F16(&vh.0), &kh.1, &vh.1),
        ];
        for (kd, vd, kf, vf) in &cases {
            let f = PagedKv {
                k: KvData::F32(kf),
                v: KvData::F32(vf),
                block_size: bs,
            };
            let mut expect = vec![0f32; q.len()];
            paged_attention(&q, f, &seq, s, &mut expect).unwrap();
            let kv = PagedKv {
                k: *kd,
                v: *vd,
                block_size: bs,
            };
            every_path(|| {
                let mut out = vec![0f32; q.len()];
                paged_attention(&q, kv, &seq, s, &mut out).unwrap();
                assert_close(&out, &expect, 1e-6);
            });
        }
    }
}
