//! Tests of the paged attention kernels: rows and tiles against a contiguous reference, block
//! table errors, quantized and 16-bit pools.

use super::*;

mod rows_and_tiles {
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

mod quantized_kv {
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
