use super::*;
use crate::cpu::testutil::{assert_close, every_path, rand_vec};

/// Factors of one slot, owned.
struct Factors {
    a: Vec<f32>,
    bt: Vec<f32>,
    rank: usize,
    blocks: Vec<LoraBlock>,
}

impl Factors {
    fn new(dims: LoraDims, rank: usize, blocks: Vec<LoraBlock>, seed: u64) -> Self {
        Self {
            a: rand_vec(rank * dims.inputs, seed),
            bt: rand_vec(rank * dims.outputs, seed + 1),
            rank,
            blocks,
        }
    }

    fn mat(&self) -> LoraMat<'_> {
        LoraMat {
            a: &self.a,
            bt: &self.bt,
            rank: self.rank,
            blocks: &self.blocks,
        }
    }

    /// `y += (x·Aᵀ)·Bᵀ` with B zero outside the blocks, in f64.
    fn reference(&self, x: &[f32], y: &mut [f32], dims: LoraDims) {
        let t: Vec<f64> = (0..self.rank)
            .map(|r| {
                let a = &self.a[r * dims.inputs..][..dims.inputs];
                a.iter().zip(x).map(|(&a, &x)| a as f64 * x as f64).sum()
            })
            .collect();
        for b in &self.blocks {
            for o in b.outputs.clone() {
                let d: f64 = b
                    .ranks
                    .clone()
                    .map(|r| t[r] * self.bt[r * dims.outputs + o] as f64)
                    .sum();
                y[o] += d as f32;
            }
        }
    }
}

const DIMS: LoraDims = LoraDims {
    inputs: 37,
    outputs: 53,
};

/// Three slots: a plain module (one block over everything), a fused one whose B is
/// block-diagonal over three projections of unequal widths, and an adapter without this module.
fn slots() -> Vec<Option<Factors>> {
    let whole = vec![LoraBlock {
        outputs: 0..53,
        ranks: 0..5,
    }];
    let fused = vec![
        LoraBlock {
            outputs: 0..29,
            ranks: 0..3,
        },
        LoraBlock {
            outputs: 29..41,
            ranks: 3..6,
        },
        LoraBlock {
            outputs: 41..53,
            ranks: 6..9,
        },
    ];
    vec![
        Some(Factors::new(DIMS, 5, whole, 10)),
        Some(Factors::new(DIMS, 9, fused, 20)),
        None,
    ]
}

#[test]
fn every_row_gets_its_own_adapters_update() {
    let rows = 61;
    let x = rand_vec(rows * DIMS.inputs, 1);
    let y0 = rand_vec(rows * DIMS.outputs, 2);
    // Gaps (rows 0..2, 40..41), a segment longer than one task, slots repeated and one absent.
    let segments = vec![(2..5, 1), (5..23, 0), (23..40, 1), (41..44, 2), (44..61, 0)];
    let owned = slots();
    let mats: Vec<_> = owned.iter().map(|f| f.as_ref().map(Factors::mat)).collect();
    let mut expect = y0.clone();
    for (r, s) in &segments {
        let Some(f) = &owned[*s] else { continue };
        for row in r.clone() {
            let y = &mut expect[row * DIMS.outputs..][..DIMS.outputs];
            f.reference(&x[row * DIMS.inputs..][..DIMS.inputs], y, DIMS);
        }
    }
    every_path(|| {
        let mut y = y0.clone();
        lora_add(&x, &mut y, DIMS, &segments, &mats).unwrap();
        assert_close(&y, &expect, 1e-5);
    });
}

#[test]
fn a_rows_update_does_not_depend_on_its_batch() {
    let rows = 40;
    let x = rand_vec(rows * DIMS.inputs, 3);
    let owned = slots();
    let mats: Vec<_> = owned.iter().map(|f| f.as_ref().map(Factors::mat)).collect();
    every_path(|| {
        let mut together = vec![0f32; rows * DIMS.outputs];
        lora_add(&x, &mut together, DIMS, &[(0..rows, 1)], &mats).unwrap();
        for row in [0, 7, 16, 39] {
            let mut alone = vec![0f32; DIMS.outputs];
            let xr = &x[row * DIMS.inputs..][..DIMS.inputs];
            lora_add(xr, &mut alone, DIMS, &[(0..1, 1)], &mats).unwrap();
            assert_eq!(alone, together[row * DIMS.outputs..][..DIMS.outputs]);
        }
    });
}

#[test]
fn inconsistent_shapes_and_segments_are_errors() {
    let owned = slots();
    let mats: Vec<_> = owned.iter().map(|f| f.as_ref().map(Factors::mat)).collect();
    let x = vec![0f32; 4 * DIMS.inputs];
    let mut y = vec![0f32; 4 * DIMS.outputs];
    let bad_segments: [&[LoraSegment]; 4] = [
        &[(0..3, 0), (2..4, 1)], // overlapping
        &[(2..4, 0), (0..1, 1)], // out of order
        &[(0..5, 0)],            // past the rows
        &[(0..1, 3)],            // no such slot
    ];
    for segments in bad_segments {
        assert!(lora_add(&x, &mut y, DIMS, segments, &mats).is_err());
    }
    let mut short = vec![0f32; 3 * DIMS.outputs];
    assert!(lora_add(&x, &mut short, DIMS, &[(0..1, 0)], &mats).is_err());
    let f = owned[0].as_ref().unwrap();
    let wide = [LoraBlock {
        outputs: 0..54,
        ranks: 0..5,
    }];
    let bad = LoraMat {
        blocks: &wide,
        ..f.mat()
    };
    assert!(lora_add(&x, &mut y, DIMS, &[(0..1, 0)], &[Some(bad)]).is_err());
}
