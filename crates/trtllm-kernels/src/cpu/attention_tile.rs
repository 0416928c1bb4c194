//! Attention for many query rows of one sequence (prefill, chunked prefill) on the SIMD paths.
//!
//! A tile is up to [`tile_lanes`] queries that read the same KV head: consecutive rows × the
//! query heads of its group. The queries sit across the vector lanes (`qt` is `head_dim ×
//! lanes`), and so do their scores (`keys × lanes`): each key and value element is loaded once
//! per tile and broadcast against all of them, and the softmax runs down the columns, with no
//! horizontal sums and no transposes but the tile's queries in and outputs out. (One query at a
//! time, the row path loads every key once per query and reduces each score across lanes.) Each
//! query's sums run in `head_dim` order and key order whatever else shares its tile.

#![cfg(target_arch = "x86_64")]

use std::ops::Range;

use super::attention::{spans, AttentionSeq, AttentionShape, PagedKv};
use super::lanes::{Avx2, Avx512, Lanes};
use super::simd::Isa;

/// Vectors of queries per tile: 32 queries with AVX-512, 16 with AVX2.
const VECS: usize = 2;

/// The fewest queries per KV head worth a tile on `isa`: below one vector, most lanes would
/// idle.
pub(super) fn min_queries(isa: Isa) -> usize {
    tile_lanes(isa) / VECS
}

/// Queries per tile on `isa` (AVX2 or better).
pub(super) fn tile_lanes(isa: Isa) -> usize {
    VECS * if isa >= Isa::Avx512 {
        Avx512::N
    } else {
        Avx2::N
    }
}

/// Queries `js` of one sequence and KV head: query `j` is the sequence's new row `j / group`,
/// head `kv_head · group + j % group`.
pub(super) struct Tile {
    /// Index of the sequence in the batch.
    pub seq: usize,
    /// The batch row of the sequence's first new row.
    pub row0: usize,
    pub kv_head: usize,
    pub js: Range<usize>,
}

/// Per-thread buffers, reused across tiles.
#[derive(Default)]
pub(super) struct Scratch {
    qt: Vec<f32>,
    scores: Vec<f32>,
    sums: Vec<f32>,
    ot: Vec<f32>,
    widened: Vec<f32>,
    /// The row path's buffers, for the rows that are not in tiles.
    pub row: super::attention::RowScratch,
}

/// Writes the tile's outputs into `out` (laid out as `q`).
///
/// # Safety
/// `isa` is AVX2 or better and available; the batch passed `check_batch`; `out` is valid for
/// `q.len()` floats and no other thread writes this tile's (row, head) slots.
pub(super) unsafe fn run(
    isa: Isa,
    (q, out): (&[f32], *mut f32),
    kv: PagedKv<'_>,
    shape: AttentionShape,
    (seq, tile): (&AttentionSeq<'_>, &Tile),
    sc: &mut Scratch,
) {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim: hd,
        scale,
        ..
    } = shape;
    let group = n_heads / n_kv_heads;
    let lanes = tile_lanes(isa);
    let js = tile.js.clone();
    let slot =
        |j: usize| ((tile.row0 + j / group) * n_heads + tile.kv_head * group + j % group) * hd;
    let valid = |j: usize| seq.past + j / group + 1;
    let n_keys = valid(js.end - 1);

    // The queries across the lanes, pre-scaled; unused lanes stay zero.
    sc.qt.clear();
    sc.qt.resize(hd * lanes, 0.0);
    for (l, j) in js.clone().enumerate() {
        for (d, &x) in q[slot(j)..][..hd].iter().enumerate() {
            sc.qt[d * lanes + l] = x * scale;
        }
    }

    let head = (tile.kv_head, hd, n_kv_heads);
    // The tile's keys: from the first query's window start (the earliest) to the last's.
    let first = |j: usize| shape.first_key(valid(j));
    let p_lo = first(js.start);
    let spans = spans(seq.blocks, kv.block_size, (p_lo, n_keys));
    // Scores in the lane layout, `(n_keys - p_lo) × lanes`.
    sc.scores.resize((n_keys - p_lo) * lanes, 0.0);
    for (p, slots) in spans.clone() {
        let (keys, stride) = kv.k.head_rows(slots, head, &mut sc.widened);
        let block = &mut sc.scores[(p - p_lo) * lanes..(p - p_lo + slots.1) * lanes];
        scores(isa, &sc.qt, (keys, stride), hd, block);
        shape.cap(block);
    }
    // Few keys are hidden from only some of the tile's queries: the last ones (causality) and,
    // with a window, the first ones.
    let fill_masked = |scores: &mut [f32], x: f32| {
        for (l, j) in js.clone().enumerate() {
            for p in (p_lo..first(j)).chain(valid(j)..n_keys) {
                scores[(p - p_lo) * lanes + l] = x;
            }
        }
    };
    fill_masked(&mut sc.scores, f32::NEG_INFINITY);
    sc.sums.resize(lanes, 0.0);
    softmax(isa, &mut sc.scores, &mut sc.sums);
    // exp(-inf) came out ≈ 1e-38, which left each lane's sum (≥ 1) unchanged.
    fill_masked(&mut sc.scores, 0.0);

    sc.ot.clear();
    sc.ot.resize(hd * lanes, 0.0);
    for (p, slots) in spans {
        let (values, stride) = kv.v.head_rows(slots, head, &mut sc.widened);
        let w = &sc.scores[(p - p_lo) * lanes..(p - p_lo + slots.1) * lanes];
        weighted(isa, w, (values, stride), hd, &mut sc.ot);
    }
    for (l, j) in js.enumerate() {
        let (o, inv) = (out.add(slot(j)), 1.0 / sc.sums[l]);
        for d in 0..hd {
            *o.add(d) = sc.ot[d * lanes + l] * inv;
        }
    }
}

/// Each lane's column of `scores` (`n × lanes`, lane layout) replaced by `e^(s - max)`, and
/// its sum written to `sums[lane]`: a softmax that the caller normalizes at the end.
unsafe fn softmax(isa: Isa, scores: &mut [f32], sums: &mut [f32]) {
    match isa {
        Isa::Avx512 => softmax_avx512(scores, sums),
        _ => softmax_avx2(scores, sums),
    }
}

/// # Safety
/// The processor has the features enabled here (callers check `isa()` first), and
/// the arguments meet the contract of the body it enters.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn softmax_avx2(scores: &mut [f32], sums: &mut [f32]) {
    softmax_columns::<Avx2>(scores, sums)
}

/// # Safety
/// The processor has the features enabled here (callers check `isa()` first), and
/// the arguments meet the contract of the body it enters.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn softmax_avx512(scores: &mut [f32], sums: &mut [f32]) {
    softmax_columns::<Avx512>(scores, sums)
}

#[inline(always)]
unsafe fn softmax_columns<L: Lanes>(scores: &mut [f32], sums: &mut [f32]) {
    let lanes = sums.len();
    let ptr = scores.as_mut_ptr();
    for v in (0..lanes).step_by(L::N) {
        let mut max = L::splat(f32::NEG_INFINITY);
        for row in (0..scores.len()).step_by(lanes) {
            max = L::max(max, L::load(ptr.add(row + v)));
        }
        let mut sum = L::zero();
        for row in (0..scores.len()).step_by(lanes) {
            let e = L::exp(L::sub(L::load(ptr.add(row + v)), max));
            L::store(ptr.add(row + v), e);
            sum = L::add(sum, e);
        }
        L::store(sums.as_mut_ptr().add(v), sum);
    }
}

/// `out[p · lanes + l] = Σ_d key_p[d] · qt[d · lanes + l]` for the `out.len() / lanes` keys
/// `stride` apart in `keys`.
unsafe fn scores(isa: Isa, qt: &[f32], keys: (&[f32], usize), hd: usize, out: &mut [f32]) {
    match isa {
        Isa::Avx512 => scores_avx512(qt, keys, hd, out),
        _ => scores_avx2(qt, keys, hd, out),
    }
}

/// # Safety
/// The processor has the features enabled here (callers check `isa()` first), and
/// the arguments meet the contract of the body it enters.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_avx2(qt: &[f32], keys: (&[f32], usize), hd: usize, out: &mut [f32]) {
    scores_tiles::<Avx2, 4>(qt, keys, hd, out)
}

/// # Safety
/// The processor has the features enabled here (callers check `isa()` first), and
/// the arguments meet the contract of the body it enters.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn scores_avx512(qt: &[f32], keys: (&[f32], usize), hd: usize, out: &mut [f32]) {
    scores_tiles::<Avx512, 8>(qt, keys, hd, out)
}

/// `KR` keys × `VECS` query vectors of accumulators; a short last tile repeats its last key.
#[inline(always)]
unsafe fn scores_tiles<L: Lanes, const KR: usize>(
    qt: &[f32],
    (keys, stride): (&[f32], usize),
    hd: usize,
    out: &mut [f32],
) {
    let lanes = VECS * L::N;
    let n = out.len() / lanes;
    let mut p = 0;
    while p < n {
        let kn = KR.min(n - p);
        let kr: [*const f32; KR] =
            std::array::from_fn(|i| keys.as_ptr().add((p + i.min(kn - 1)) * stride));
        let mut acc = [[L::zero(); VECS]; KR];
        for d in 0..hd {
            // Loops, not `array::from_fn`: a closure is compiled without this function's
            // target features, and its intrinsics would become calls.
            let mut qv = [L::zero(); VECS];
            for (v, x) in qv.iter_mut().enumerate() {
                *x = L::load(qt.as_ptr().add(d * lanes + v * L::N));
            }
            for (a, k) in acc.iter_mut().zip(&kr) {
                let kb = L::splat(*k.add(d));
                for (x, &y) in a.iter_mut().zip(&qv) {
                    *x = L::fmadd(kb, y, *x);
                }
            }
        }
        for (i, a) in acc.iter().enumerate().take(kn) {
            for (v, &x) in a.iter().enumerate() {
                L::store(out.as_mut_ptr().add((p + i) * lanes + v * L::N), x);
            }
        }
        p += kn;
    }
}

/// `ot[d · lanes + l] += Σ_p w[p · lanes + l] · value_p[d]` for the `w.len() / lanes` values
/// `stride` apart.
unsafe fn weighted(isa: Isa, w: &[f32], values: (&[f32], usize), hd: usize, ot: &mut [f32]) {
    match isa {
        Isa::Avx512 => weighted_avx512(w, values, hd, ot),
        _ => weighted_avx2(w, values, hd, ot),
    }
}

/// # Safety
/// The processor has the features enabled here (callers check `isa()` first), and
/// the arguments meet the contract of the body it enters.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_avx2(w: &[f32], values: (&[f32], usize), hd: usize, ot: &mut [f32]) {
    weighted_tiles::<Avx2, 4>(w, values, hd, ot)
}

/// # Safety
/// The processor has the features enabled here (callers check `isa()` first), and
/// the arguments meet the contract of the body it enters.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn weighted_avx512(w: &[f32], values: (&[f32], usize), hd: usize, ot: &mut [f32]) {
    weighted_tiles::<Avx512, 8>(w, values, hd, ot)
}

/// `DR` output dimensions × `VECS` query vectors of accumulators, loaded from and stored to `ot`
/// once per block; a short last tile repeats its last dimension.
#[inline(always)]
unsafe fn weighted_tiles<L: Lanes, const DR: usize>(
    w: &[f32],
    (values, stride): (&[f32], usize),
    hd: usize,
    ot: &mut [f32],
) {
    let lanes = VECS * L::N;
    let n = w.len() / lanes;
    let mut d = 0;
    while d < hd {
        let dn = DR.min(hd - d);
        let col: [*const f32; DR] = std::array::from_fn(|i| values.as_ptr().add(d + i.min(dn - 1)));
        let mut acc = [[L::zero(); VECS]; DR];
        for (i, a) in acc.iter_mut().enumerate() {
            for (v, x) in a.iter_mut().enumerate() {
                *x = L::load(ot.as_ptr().add((d + i.min(dn - 1)) * lanes + v * L::N));
            }
        }
        for p in 0..n {
            let mut wv = [L::zero(); VECS];
            for (v, x) in wv.iter_mut().enumerate() {
                *x = L::load(w.as_ptr().add(p * lanes + v * L::N));
            }
            for (a, c) in acc.iter_mut().zip(&col) {
                let vb = L::splat(*c.add(p * stride));
                for (x, &y) in a.iter_mut().zip(&wv) {
                    *x = L::fmadd(vb, y, *x);
                }
            }
        }
        for (i, a) in acc.iter().enumerate().take(dn) {
            for (v, &x) in a.iter().enumerate() {
                L::store(ot.as_mut_ptr().add((d + i) * lanes + v * L::N), x);
            }
        }
        d += dn;
    }
}

#[cfg(test)]
mod tests {
    use super::super::attention::{paged_attention, AttentionSeq, AttentionShape, KvData, PagedKv};
    use crate::cpu::testutil::{every_path, rand_vec};

    /// A row's output is the same bits whether it is computed in one 40-row prefill (tiles of
    /// 32 or 16 queries) or as one of the last 20 rows after a 20-row chunk (tiles cut
    /// elsewhere), and whatever other sequences share the batch.
    #[test]
    fn a_query_does_not_depend_on_its_tile() {
        let s = AttentionShape {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 20,
            scale: 0.3,
            window: None,
            softcap: None,
        };
        let (bs, len) = (8, 40);
        let kv_row = s.n_kv_heads * s.head_dim;
        let k = rand_vec(len * kv_row, 1);
        let v = rand_vec(len * kv_row, 2);
        let q = rand_vec(len * s.n_heads * s.head_dim, 3);
        let blocks: Vec<u32> = (0..(len / bs) as u32).collect();
        let kv = PagedKv {
            k: KvData::F32(&k),
            v: KvData::F32(&v),
            block_size: bs,
        };
        let half = q.len() / 2;
        every_path(|| {
            let whole = AttentionSeq {
                blocks: &blocks,
                past: 0,
                n_new: len,
            };
            let mut all = vec![0f32; q.len()];
            paged_attention(&q, kv, &[whole], s, &mut all).unwrap();
            let other = AttentionSeq {
                blocks: &blocks[..2],
                past: 3,
                n_new: 7,
            };
            let last = AttentionSeq {
                blocks: &blocks,
                past: len / 2,
                n_new: len / 2,
            };
            let q2: Vec<f32> = q[..7 * s.n_heads * s.head_dim]
                .iter()
                .chain(&q[half..])
                .copied()
                .collect();
            let mut out = vec![0f32; q2.len()];
            paged_attention(&q2, kv, &[other, last], s, &mut out).unwrap();
            let tail = &out[7 * s.n_heads * s.head_dim..];
            assert!(tail
                .iter()
                .zip(&all[half..])
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        });
    }
}
