//! Each CUDA kernel against the CPU kernel on random inputs of awkward sizes. They need a GPU, so
//! they are ignored by `cargo test`; `cargo xtask test-gpu` runs them (and fails without one).

use super::CudaDevice;
use crate::cpu::{self, testutil::rand_vec, MatRef, WeightData};

pub(super) fn device() -> CudaDevice {
    CudaDevice::new(0).expect("a CUDA device")
}

pub(super) fn assert_close(gpu: &[f32], cpu: &[f32], tol: f32, what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: length");
    for (i, (a, b)) in gpu.iter().zip(cpu).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what}[{i}]: gpu {a} vs cpu {b}"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo xtask test-gpu"]
fn norms_match_cpu() {
    let d = device();
    let (rows, cols) = (5, 1000);
    let x = rand_vec(rows * cols, 1);
    let r = rand_vec(rows * cols, 2);
    let w = rand_vec(cols, 3);
    let b = rand_vec(cols, 4);
    let (xd, wd, bd) = (
        d.upload(&x).unwrap(),
        d.upload(&w).unwrap(),
        d.upload(&b).unwrap(),
    );
    let mut out = d.zeros::<f32>(rows * cols).unwrap();
    let mut want = x.clone();
    d.rms_norm(&xd, None, &wd, &mut out, 1e-5).unwrap();
    cpu::rms_norm(&mut want, &w, 1e-5).unwrap();
    assert_close(&d.download(&out).unwrap(), &want, 1e-5, "rms_norm");
    let mut rd = d.upload(&r).unwrap();
    d.rms_norm(&xd, Some(&mut rd), &wd, &mut out, 1e-5).unwrap();
    let mut sum: Vec<f32> = x.iter().zip(&r).map(|(a, b)| a + b).collect();
    assert_close(&d.download(&rd).unwrap(), &sum, 0.0, "residual");
    cpu::rms_norm(&mut sum, &w, 1e-5).unwrap();
    assert_close(&d.download(&out).unwrap(), &sum, 1e-5, "add_rms_norm");
    let mut want = x.clone();
    d.layer_norm(&xd, None, (&wd, &bd), &mut out, 1e-5).unwrap();
    cpu::layer_norm(&mut want, &w, &b, 1e-5).unwrap();
    assert_close(&d.download(&out).unwrap(), &want, 1e-5, "layer_norm");
}

#[test]
#[ignore = "needs a CUDA GPU: cargo xtask test-gpu"]
fn rope_activations_softmax_and_embedding_match_cpu() {
    let d = device();
    let (heads, hd) = (3, 64);
    let positions = [0usize, 1, 17, 4000];
    // Two sequences, one past LongRoPE's original context: two frequency sets and a scale.
    let scaling = cpu::RopeScaling::LongRope {
        short_factor: vec![1.0; hd / 2],
        long_factor: (0..hd / 2).map(|j| 1.0 + j as f32).collect(),
        original_max_position_embeddings: 64,
        attention_factor: 1.25,
    };
    let table = cpu::RopeTable::new(hd, 10000.0, &scaling);
    let freqs = table.step_freqs([(2, 18), (2, 4001)]);
    let x = rand_vec(positions.len() * heads * hd, 5);
    let mut xd = d.upload(&x).unwrap();
    let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
    let dev_freqs = d.upload_rope(&freqs, hd).unwrap();
    d.rope(&mut xd, &d.upload(&pos).unwrap(), &dev_freqs, heads, hd)
        .unwrap();
    let mut want = x.clone();
    cpu::apply_rope(&mut want, &positions, heads, hd, &freqs).unwrap();
    assert_close(&d.download(&xd).unwrap(), &want, 1e-5, "rope");

    let (rows, inter) = (3, 333);
    let gu = rand_vec(rows * 2 * inter, 6);
    let mut out = d.zeros::<f32>(rows * inter).unwrap();
    d.silu_mul(&d.upload(&gu).unwrap(), rows, &mut out).unwrap();
    let mut want = vec![0f32; rows * inter];
    cpu::silu_mul(&gu, rows, &mut want).unwrap();
    assert_close(&d.download(&out).unwrap(), &want, 1e-5, "silu_mul");
    d.gelu_tanh_mul(&d.upload(&gu).unwrap(), rows, &mut out)
        .unwrap();
    cpu::gelu_tanh_mul(&gu, rows, &mut want).unwrap();
    assert_close(&d.download(&out).unwrap(), &want, 1e-5, "gelu_tanh_mul");

    let mut xd = d.upload(&gu).unwrap();
    d.gelu_tanh(&mut xd).unwrap();
    let mut want = gu.clone();
    cpu::gelu_tanh(&mut want);
    assert_close(&d.download(&xd).unwrap(), &want, 1e-5, "gelu");

    let cols = 1001;
    let logits: Vec<f32> = rand_vec(2 * cols, 7).iter().map(|v| v * 10.0).collect();
    let mut xd = d.upload(&logits).unwrap();
    d.softmax(&mut xd, cols).unwrap();
    let mut want = logits.clone();
    want.chunks_exact_mut(cols).for_each(cpu::softmax_inplace);
    assert_close(&d.download(&xd).unwrap(), &want, 1e-5, "softmax");

    let (vocab, dim) = (50, 96);
    let t = rand_vec(vocab * dim, 8);
    let ids = [3u32, 0, 49, 3];
    let mut out = d.zeros::<f32>(ids.len() * dim).unwrap();
    d.embedding(
        &d.upload(&t).unwrap(),
        &d.upload(&ids).unwrap(),
        dim,
        &mut out,
    )
    .unwrap();
    let mut want = vec![0f32; ids.len() * dim];
    cpu::embedding_gather(
        MatRef::new(WeightData::F32(&t), vocab, dim).unwrap(),
        &ids,
        &mut want,
    )
    .unwrap();
    assert_close(&d.download(&out).unwrap(), &want, 0.0, "embedding");
}

/// Two sequences over a scrambled block table: keys and values written by the GPU into f32,
/// INT8 and FP8 pools, then attention on the GPU against the CPU kernel over the same pools.
#[test]
#[ignore = "needs a CUDA GPU: cargo xtask test-gpu"]
fn paged_attention_and_kv_writes_match_cpu() {
    use super::{DeviceKv, KvSide};
    use cpu::{AttentionSeq, AttentionShape, KvData, PagedKv};
    let d = device();
    let (bs, nkv, hd, blocks) = (4, 2, 40, 16);
    let shape = AttentionShape {
        n_heads: 6,
        n_kv_heads: nkv,
        head_dim: hd,
        scale: 1.0 / (hd as f32).sqrt(),
        window: None,
        softcap: None,
    };
    let kv_row = nkv * hd;
    let tables = [
        vec![7u32, 2, 11, 4, 13, 1, 15, 3, 8, 10],
        vec![0, 9, 5, 12, 6],
    ];
    let lens = [40usize, 20];
    let slots: Vec<usize> = (0..2)
        .flat_map(|s| {
            let t = &tables[s];
            (0..lens[s]).map(move |p| t[p / bs] as usize * bs + p % bs)
        })
        .collect();
    let k_rows = rand_vec(slots.len() * kv_row, 40);
    let v_rows = rand_vec(slots.len() * kv_row, 41);
    // A prefill pass (row tiles of 16 and 4, keys in two tiles) and a decode pass.
    let passes = [([37usize, 0], [3usize, 20]), ([39, 19], [1, 1])];
    let values = blocks * bs * kv_row;
    let scales = blocks * bs * nkv;
    for storage in ["f32", "bf16", "f16", "int8", "fp8"] {
        let mut kv = match storage {
            "f32" => DeviceKv::F32 {
                k: d.zeros(values).unwrap(),
                v: d.zeros(values).unwrap(),
            },
            "bf16" => DeviceKv::Bf16 {
                k: d.zeros(values).unwrap(),
                v: d.zeros(values).unwrap(),
            },
            "f16" => DeviceKv::F16 {
                k: d.zeros(values).unwrap(),
                v: d.zeros(values).unwrap(),
            },
            "int8" => DeviceKv::Int8 {
                k: d.zeros(values).unwrap(),
                k_scales: d.zeros(scales).unwrap(),
                v: d.zeros(values).unwrap(),
                v_scales: d.zeros(scales).unwrap(),
            },
            _ => DeviceKv::Fp8 {
                k: d.zeros(values).unwrap(),
                k_scales: d.zeros(scales).unwrap(),
                v: d.zeros(values).unwrap(),
                v_scales: d.zeros(scales).unwrap(),
            },
        };
        // Every position written as if the sequences were prefilled whole, then attention for
        // the new rows only.
        let whole: Vec<AttentionSeq<'_>> = (0..2)
            .map(|s| AttentionSeq {
                blocks: &tables[s],
                past: 0,
                n_new: lens[s],
            })
            .collect();
        let fill = d.attention_batch(&whole, (&kv, bs), shape).unwrap();
        for (side, rows) in [(KvSide::Key, &k_rows), (KvSide::Value, &v_rows)] {
            d.kv_write((&mut kv, side), &d.upload(rows).unwrap(), &fill)
                .unwrap();
        }
        for (past, n_new) in passes {
            let seqs: Vec<AttentionSeq<'_>> = (0..2)
                .map(|s| AttentionSeq {
                    blocks: &tables[s],
                    past: past[s],
                    n_new: n_new[s],
                })
                .collect();
            let q = rand_vec((n_new[0] + n_new[1]) * shape.n_heads * hd, 42);
            let batch = d.attention_batch(&seqs, (&kv, bs), shape).unwrap();
            let mut out = d.zeros::<f32>(q.len()).unwrap();
            d.paged_attention(&d.upload(&q).unwrap(), &kv, (&batch, &shape), &mut out)
                .unwrap();
            let gpu = d.download(&out).unwrap();
            let mut want = vec![0f32; q.len()];
            // The CPU kernel reads the very codes and scales the GPU wrote.
            let (kq, ks, vq, vs);
            let (k8, v8);
            let (kf, vf);
            let (kh, vh);
            let pool = match &kv {
                DeviceKv::F32 { k, v } => {
                    (kf, vf) = (d.download(k).unwrap(), d.download(v).unwrap());
                    (KvData::F32(&kf), KvData::F32(&vf))
                }
                DeviceKv::Bf16 { k, v } => {
                    (kh, vh) = (d.download(k).unwrap(), d.download(v).unwrap());
                    (KvData::Bf16(&kh), KvData::Bf16(&vh))
                }
                DeviceKv::F16 { k, v } => {
                    (kh, vh) = (d.download(k).unwrap(), d.download(v).unwrap());
                    (KvData::F16(&kh), KvData::F16(&vh))
                }
                DeviceKv::Int8 {
                    k,
                    k_scales,
                    v,
                    v_scales,
                } => {
                    (k8, ks, v8, vs) = (
                        d.download(k).unwrap(),
                        d.download(k_scales).unwrap(),
                        d.download(v).unwrap(),
                        d.download(v_scales).unwrap(),
                    );
                    (
                        KvData::Int8 {
                            q: &k8,
                            scales: &ks,
                        },
                        KvData::Int8 {
                            q: &v8,
                            scales: &vs,
                        },
                    )
                }
                DeviceKv::Fp8 {
                    k,
                    k_scales,
                    v,
                    v_scales,
                } => {
                    (kq, ks, vq, vs) = (
                        d.download(k).unwrap(),
                        d.download(k_scales).unwrap(),
                        d.download(v).unwrap(),
                        d.download(v_scales).unwrap(),
                    );
                    (
                        KvData::Fp8 {
                            q: &kq,
                            scales: &ks,
                        },
                        KvData::Fp8 {
                            q: &vq,
                            scales: &vs,
                        },
                    )
                }
            };
            let paged = PagedKv {
                k: pool.0,
                v: pool.1,
                block_size: bs,
            };
            cpu::paged_attention(&q, paged, &seqs, shape, &mut want).unwrap();
            assert_close(
                &gpu,
                &want,
                1e-4,
                &format!("{storage} attention, {n_new:?} new rows"),
            );
        }
    }
}

/// A block copy (a forked beam's copy of a shared block) moves values and scales of both sides
/// and nothing else.
#[test]
#[ignore = "needs a CUDA GPU: cargo xtask test-gpu"]
fn kv_block_copies_move_values_and_scales() {
    use super::DeviceKv;
    let d = device();
    let (slots, row, heads) = (12, 6, 2);
    let vals = rand_vec(slots * row, 70);
    let scales = rand_vec(slots * heads, 71);
    let mut kv = DeviceKv::Int8 {
        k: d.upload(&vals.iter().map(|v| (v * 100.0) as i8).collect::<Vec<_>>())
            .unwrap(),
        k_scales: d.upload(&scales).unwrap(),
        v: d.upload(&vals.iter().map(|v| (v * 50.0) as i8).collect::<Vec<_>>())
            .unwrap(),
        v_scales: d.upload(&scales).unwrap(),
    };
    // Slots 8..12 get slots 0..4; a copy past the end is refused.
    d.kv_copy_slots(&mut kv, (0, 8, 4), (row, heads)).unwrap();
    assert!(d.kv_copy_slots(&mut kv, (0, 9, 4), (row, heads)).is_err());
    let DeviceKv::Int8 { k, k_scales, .. } = &kv else {
        unreachable!()
    };
    let (k, ks) = (d.download(k).unwrap(), d.download(k_scales).unwrap());
    let mut want: Vec<i8> = vals.iter().map(|v| (v * 100.0) as i8).collect();
    want.copy_within(0..4 * row, 8 * row);
    assert_eq!(k, want);
    let mut want = scales.clone();
    want.copy_within(0..4 * heads, 8 * heads);
    assert_eq!(ks, want);
}

#[test]
#[ignore = "needs a CUDA GPU: cargo xtask test-gpu"]
fn glue_kernels_scale_gather_copy_and_round_through_fp8() {
    let d = device();
    let (rows, cols) = (3, 70);
    let x = rand_vec(rows * cols, 60);
    let s = rand_vec(cols, 61);
    let mut xd = d.upload(&x).unwrap();
    d.scale_cols(&mut xd, &d.upload(&s).unwrap()).unwrap();
    let want: Vec<f32> = x.iter().enumerate().map(|(i, v)| v * s[i % cols]).collect();
    assert_close(&d.download(&xd).unwrap(), &want, 0.0, "scale_cols");

    let perm: Vec<u32> = (0..cols as u32)
        .map(|c| (c * 31 + 7) % cols as u32)
        .collect();
    let mut gathered = d.zeros::<f32>(rows * cols).unwrap();
    let xd = d.upload(&x).unwrap();
    d.gather_cols(&xd, &d.upload(&perm).unwrap(), &mut gathered)
        .unwrap();
    let want: Vec<f32> = x
        .chunks_exact(cols)
        .flat_map(|row| perm.iter().map(|&c| row[c as usize]))
        .collect();
    assert_close(&d.download(&gathered).unwrap(), &want, 0.0, "gather_cols");

    let mut part = d.zeros::<f32>(rows * 20).unwrap();
    d.copy_cols((&d.upload(&x).unwrap(), cols), 33, &mut part)
        .unwrap();
    let want: Vec<f32> = x
        .chunks_exact(cols)
        .flat_map(|r| r[33..53].to_vec())
        .collect();
    assert_close(&d.download(&part).unwrap(), &want, 0.0, "copy_cols");

    // Every value comes back as scale × an E4M3 code, within half a step of the original.
    let scale = 0.01;
    let mut xd = d.upload(&x).unwrap();
    d.fp8_qdq(&mut xd, scale).unwrap();
    let codes: Vec<f32> = (0u8..=255)
        .filter(|b| b & 0x7f != 0x7f)
        .map(cpu::e4m3_to_f32)
        .collect();
    for (got, v) in d.download(&xd).unwrap().iter().zip(&x) {
        assert!(
            codes.iter().any(|c| (c * scale - got).abs() < 1e-9),
            "{got} is not a code"
        );
        assert!(
            (got - v).abs() <= v.abs() / 16.0 + scale / 1024.0,
            "{got} vs {v}"
        );
    }
}
