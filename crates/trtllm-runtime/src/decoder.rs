//! The one decoder every model family and every device runs: pre-norm blocks of attention and
//! MLP around a residual stream, written once against [`Backend`], the operations a device
//! provides. A family is a mapping onto [`ModelConfig`] (the builder's job); a device is an
//! implementation of [`Backend`] (`cpu_backend`, `cuda`). Weights and activations are the
//! backend's own types, so a tensor of one device cannot reach another's kernels.

use crate::kv_cache::KvPool;
use crate::lora::{self, DeviceLora, LoraFactors, LoraModule, LoraPass, LoraWeights};
use crate::model::{
    ActivationObserver, BatchLayout, HostModel, Layer, Linear, Mlp, Norm, SeqChunk,
};
use crate::parallel::{Comm, Groups};
use crate::{MlpKind, ModelConfig, MoeConfig, Result, RuntimeError};
use trtllm_quant::kernels::LoraSegment;

/// The operations of one device. Activations are `[rows × cols]` f32, row-major.
pub(crate) trait Backend {
    type Act;
    type Linear;
    type Norm;
    /// What every layer of one forward pass shares (positions, attention metadata).
    type Step<'a>;
    /// The KV pool's layers in this device's memory.
    type Pool;
    /// One module's LoRA factors in this device's memory.
    type LoraMat;
    /// A pass's adapted rows and the slot (the pass's adapter) of each, in this device's memory.
    type LoraRows;

    /// A linear layer of the engine, placed on the device (packed formats stay packed).
    fn linear_of(&self, model: &HostModel, l: &Linear) -> Result<Self::Linear>;
    fn norm_of(&self, model: &HostModel, n: &Norm) -> Result<Self::Norm>;
    /// Host rows (the gathered embeddings) onto the device.
    fn upload(&self, x: Vec<f32>) -> Result<Self::Act>;
    fn download(&self, x: Self::Act) -> Result<Vec<f32>>;
    /// `x` summed over the tensor-parallel group `tp` (each rank holds a partial product).
    fn all_reduce(&self, x: Self::Act, tp: &dyn Comm) -> Result<Self::Act>;
    /// This device's half of `pool`: an error for a pool created on another device (the one
    /// check; past it the types keep each device to its own memory).
    fn pool<'p>(&self, pool: &'p mut KvPool) -> Result<&'p mut Self::Pool>;
    fn lora_mat(&self, f: &LoraFactors) -> Result<Self::LoraMat>;
    /// A pass of `rows` rows whose `segments` use `slots` adapters.
    fn lora_rows(
        &self,
        segments: &[LoraSegment],
        rows: usize,
        slots: usize,
    ) -> Result<Self::LoraRows>;
    /// `y[r] += (x[r]·Aᵀ)·Bᵀ` for every adapted row with the factors of its slot (`None`: that
    /// adapter leaves this module alone): every adapter of the pass in one pass over the rows.
    fn lora_add(
        &self,
        x: &Self::Act,
        y: &mut Self::Act,
        rows: &Self::LoraRows,
        slots: &[Option<&Self::LoraMat>],
    ) -> Result<()>;
    /// This device's form of an adapter: an error for one another device's runner loaded.
    fn lora<'l>(&self, w: &'l LoraWeights) -> Result<&'l DeviceLora<Self>>
    where
        Self: Sized;
    fn step<'a>(
        &self,
        batch: &'a [SeqChunk<'a>],
        layout: &BatchLayout,
        pool: &mut Self::Pool,
    ) -> Result<Self::Step<'a>>;

    /// `norm(x)`; with `residual`, first `residual += x`, then `norm(residual)`.
    fn norm(
        &self,
        n: &Self::Norm,
        x: &Self::Act,
        residual: Option<&mut Self::Act>,
    ) -> Result<Self::Act>;
    /// `(x ∘ pre_quant_scale) · Wᵀ + bias`.
    fn linear(&self, l: &Self::Linear, x: &Self::Act, rows: usize) -> Result<Self::Act>;
    /// Lets `obs` see a linear module's input (calibration).
    fn observe(
        &self,
        obs: &mut dyn ActivationObserver,
        module: &str,
        x: &Self::Act,
        rows: usize,
    ) -> Result<()>;
    /// The columns of `x` (rows `total` wide) split into consecutive parts of `widths`.
    fn split_cols<const N: usize>(
        &self,
        x: &Self::Act,
        total: usize,
        widths: [usize; N],
    ) -> Result<[Self::Act; N]>;
    /// Rotary embedding of every head (`heads` of `head_dim`) at the step's positions, by layer
    /// `layer`'s table; nothing for a model without RoPE (learned positions).
    fn rope(
        &self,
        x: &mut Self::Act,
        heads: usize,
        layer: usize,
        step: &Self::Step<'_>,
    ) -> Result<()>;
    /// Writes the step's keys and values into layer `layer` of `pool`, then attends `q` over
    /// each sequence's cache.
    fn attention(
        &self,
        layer: usize,
        qkv: (&Self::Act, &Self::Act, &Self::Act),
        step: &Self::Step<'_>,
        pool: &mut Self::Pool,
    ) -> Result<Self::Act>;
    /// The MLP's activation of the input projection `up` (`rows` rows; gated kinds halve its
    /// width, so that experts of any size share it).
    fn activation(&self, mlp: MlpKind, up: Self::Act, rows: usize) -> Result<Self::Act>;
    /// Rows `rows` of `x` (`width` wide), in that order.
    fn gather_rows(&self, x: &Self::Act, rows: &[usize], width: usize) -> Result<Self::Act>;
    /// `rows × width` zeros.
    fn zeros(&self, rows: usize, width: usize) -> Result<Self::Act>;
    /// `out[rows[i]] += weights[i] · x[i]` for each row `i` of `x` (`width` wide; `rows` distinct).
    fn add_rows_scaled(
        &self,
        out: &mut Self::Act,
        x: &Self::Act,
        routed: (&[usize], &[f32]),
        width: usize,
    ) -> Result<()>;
}

/// What every linear module of one forward pass sees beside its input.
struct Pass<'p, 'a, B: Backend> {
    obs: &'p mut dyn ActivationObserver,
    loras: Option<LoraPass<'a, B>>,
}

/// A layer's MLP on the device.
enum DeviceMlp<B: Backend> {
    Dense {
        up: B::Linear,
        down: B::Linear,
    },
    Experts {
        router: B::Linear,
        experts: Vec<(B::Linear, B::Linear)>,
    },
}

/// A layer's weights on the device, beside the host layer that names them.
struct DeviceLayer<B: Backend> {
    attn_norm: B::Norm,
    qkv: B::Linear,
    qk_norm: Option<(B::Norm, B::Norm)>,
    post_norms: Option<(B::Norm, B::Norm)>,
    o: B::Linear,
    mlp_norm: B::Norm,
    mlp: DeviceMlp<B>,
}

pub(crate) struct Decoder<B: Backend> {
    /// The engine's tensors as the file holds them: configuration, names, embedding tables.
    pub model: HostModel,
    pub backend: B,
    layers: Vec<DeviceLayer<B>>,
    /// Only on the last pipeline stage.
    final_norm: Option<B::Norm>,
    lm_head: Option<B::Linear>,
    /// The other ranks of a split engine.
    par: Option<Groups>,
}

impl<B: Backend> Decoder<B> {
    pub fn new(model: HostModel, backend: B, par: Option<Groups>) -> Result<Self> {
        let pair = |p: &Option<(Norm, Norm)>| -> Result<Option<(B::Norm, B::Norm)>> {
            p.as_ref()
                .map(|(a, b)| Ok((backend.norm_of(&model, a)?, backend.norm_of(&model, b)?)))
                .transpose()
        };
        let layer = |l: &Layer| -> Result<DeviceLayer<B>> {
            Ok(DeviceLayer {
                attn_norm: backend.norm_of(&model, &l.attn_norm)?,
                qkv: backend.linear_of(&model, &l.qkv)?,
                qk_norm: pair(&l.qk_norm)?,
                post_norms: pair(&l.post_norms)?,
                o: backend.linear_of(&model, &l.o)?,
                mlp_norm: backend.norm_of(&model, &l.mlp_norm)?,
                mlp: match &l.mlp {
                    Mlp::Dense { up, down } => DeviceMlp::Dense {
                        up: backend.linear_of(&model, up)?,
                        down: backend.linear_of(&model, down)?,
                    },
                    Mlp::Experts { router, experts } => DeviceMlp::Experts {
                        router: backend.linear_of(&model, router)?,
                        experts: experts
                            .iter()
                            .map(|(u, d)| {
                                Ok((backend.linear_of(&model, u)?, backend.linear_of(&model, d)?))
                            })
                            .collect::<Result<Vec<_>>>()?,
                    },
                },
            })
        };
        let layers = model.layers.iter().map(layer).collect::<Result<Vec<_>>>()?;
        let final_norm = model.final_norm.as_ref();
        let lm_head = model.lm_head.as_ref();
        Ok(Self {
            final_norm: final_norm.map(|n| backend.norm_of(&model, n)).transpose()?,
            lm_head: lm_head.map(|l| backend.linear_of(&model, l)).transpose()?,
            layers,
            model,
            backend,
            par,
        })
    }

    /// This rank's part of a split engine.
    pub fn shard(&self) -> Option<&crate::parallel::Shard> {
        self.par.as_ref().map(|p| &p.shard)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    /// Runs a batch of sequence chunks through the model in one pass, writing their keys and
    /// values into `pool` through each chunk's block table. Returns the logits rows the chunks
    /// ask for, chunk by chunk, `[rows × vocab]`. `obs` sees every linear module's input.
    pub fn forward_batch(
        &self,
        batch: &[SeqChunk<'_>],
        pool: &mut KvPool,
        obs: &mut dyn ActivationObserver,
    ) -> Result<Vec<f32>> {
        let b = &self.backend;
        let layout = BatchLayout::of(batch);
        let n = layout.tokens.len();
        let pool = b.pool(pool)?;
        let step = b.step(batch, &layout, pool)?;
        let mut pass = Pass {
            obs,
            loras: lora::pass(b, batch, n)?,
        };
        let mut hidden = b.upload(self.first_hidden(&layout)?)?;
        // Each block's output joins the residual stream in the next norm (one kernel where
        // the device fuses them); the final norm runs over every row. A stage that is not the
        // last ends with the residual stream itself, for the next.
        let norm_after = |i: usize| match self.layers.get(i) {
            Some(l) => Some(&l.attn_norm),
            None => self.final_norm.as_ref(),
        };
        let first = self.model.first_layer;
        let mut x = self.norm_into(norm_after(0), (&hidden, n), None)?;
        for (j, (layer, names)) in self.layers.iter().zip(&self.model.layers).enumerate() {
            let i = first + j;
            let o = self.attention_block(i, (layer, names), (&x, n), &step, pool, &mut pass)?;
            let mut o = self.reduce(o)?;
            if let Some((post, _)) = &layer.post_norms {
                o = b.norm(post, &o, None)?;
            }
            x = b.norm(&layer.mlp_norm, &o, Some(&mut hidden))?;
            let down = self.mlp_block(i, (layer, names), &x, n, &mut pass)?;
            let mut down = self.reduce(down)?;
            if let Some((_, post)) = &layer.post_norms {
                down = b.norm(post, &down, None)?;
            }
            x = self.norm_into(norm_after(j + 1), (&down, n), Some(&mut hidden))?;
        }
        let rows = &layout.logits_rows;
        let Some(lm_head) = &self.lm_head else {
            return self.pass_on(hidden, rows.len());
        };
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let last = b.gather_rows(&x, rows, self.config().hidden_size)?;
        let logits = b.download(b.linear(lm_head, &last, rows.len())?)?;
        let mut logits = self.gather_vocab(logits, rows.len())?;
        if let Some(cap) = self.config().features.final_logit_softcap {
            // On the host: every device downloads the logits rows for sampling anyway.
            for l in &mut logits {
                *l = cap * (*l / cap).tanh();
            }
        }
        self.logits_to_front(logits)
    }

    /// `norm(residual += x)` (or `norm(x)`); with no norm (a stage's last layer), only the
    /// residual add, and the residual stream is what goes on.
    fn norm_into(
        &self,
        norm: Option<&B::Norm>,
        (x, n): (&B::Act, usize),
        residual: Option<&mut B::Act>,
    ) -> Result<B::Act> {
        let b = &self.backend;
        match (norm, residual) {
            (Some(norm), residual) => b.norm(norm, x, residual),
            (None, Some(residual)) => {
                let h = self.model.cfg.hidden_size;
                let rows: Vec<usize> = (0..n).collect();
                // 1·x is x exactly: the sum is the fused norm's residual add, bit for bit.
                b.add_rows_scaled(residual, x, (&rows, &vec![1.0; n]), h)?;
                b.zeros(0, h)
            }
            (None, None) => b.zeros(0, self.model.cfg.hidden_size),
        }
    }

    /// A linear layer's output summed over the tensor-parallel ranks (each computed its part
    /// of the input columns).
    fn reduce(&self, x: B::Act) -> Result<B::Act> {
        match self.par.as_ref().filter(|p| p.tp.size() > 1) {
            Some(par) => self.backend.all_reduce(x, &*par.tp),
            None => Ok(x),
        }
    }

    /// The residual stream entering the first layer held here: the embeddings on the first
    /// stage, what the previous stage sent otherwise.
    fn first_hidden(&self, layout: &BatchLayout) -> Result<Vec<f32>> {
        let h = self.model.cfg.hidden_size;
        match &self.par {
            Some(par) if !par.shard.is_first_stage() => {
                let s = &par.shard;
                let mut hidden = vec![0f32; layout.tokens.len() * h];
                par.pipe
                    .recv(par.rank_of(s.pp_rank - 1, s.tp_rank), &mut hidden)?;
                Ok(hidden)
            }
            par => {
                let mut tokens = self.model.embed_tokens(layout)?;
                if let Some(par) = par.as_ref().filter(|p| p.tp.size() > 1) {
                    // Each token's row is on one rank and zeros on the others: the sum is exact.
                    par.tp.all_reduce_sum(&mut tokens)?;
                }
                self.model.embed_finish(layout, tokens)
            }
        }
    }

    /// A stage that is not the last sends its residual stream on; rank 0 then waits for the
    /// logits from the last stage.
    fn pass_on(&self, hidden: B::Act, logits_rows: usize) -> Result<Vec<f32>> {
        let par = self
            .par
            .as_ref()
            .ok_or_else(|| RuntimeError::MissingTensor(crate::engine::names::LM_HEAD.into()))?;
        let s = &par.shard;
        let hidden = self.backend.download(hidden)?;
        par.pipe
            .send(par.rank_of(s.pp_rank + 1, s.tp_rank), &hidden)?;
        if s.rank != 0 || logits_rows == 0 {
            return Ok(Vec::new());
        }
        let mut logits = vec![0f32; logits_rows * self.model.cfg.vocab_size];
        let last = par.rank_of(s.mapping.pp_size - 1, 0);
        par.pipe.recv(last, &mut logits)?;
        Ok(logits)
    }

    /// `[rows × vocab]` logits from each TP rank's `[rows × its vocabulary rows]`.
    fn gather_vocab(&self, part: Vec<f32>, rows: usize) -> Result<Vec<f32>> {
        let Some(par) = self.par.as_ref().filter(|p| p.tp.size() > 1) else {
            return Ok(part);
        };
        let vocab = self.model.cfg.vocab_size;
        let widths = par.shard.vocab_widths(vocab);
        let counts: Vec<usize> = widths.iter().map(|w| w * rows).collect();
        let all = par.tp.all_gather(&part, &counts)?;
        let mut logits = vec![0f32; rows * vocab];
        let (mut at, mut col) = (0, 0);
        for w in widths {
            for (r, src) in all[at..at + w * rows].chunks_exact(w).enumerate() {
                logits[r * vocab + col..r * vocab + col + w].copy_from_slice(src);
            }
            (at, col) = (at + w * rows, col + w);
        }
        Ok(logits)
    }

    /// On the last stage of a pipeline, the logits go to rank 0 (by TP rank 0 of the stage);
    /// every other rank's pass returns none.
    fn logits_to_front(&self, logits: Vec<f32>) -> Result<Vec<f32>> {
        match &self.par {
            Some(par) if par.shard.rank != 0 => {
                if par.shard.tp_rank == 0 && !par.shard.is_first_stage() {
                    par.pipe.send(0, &logits)?;
                }
                Ok(Vec::new())
            }
            _ => Ok(logits),
        }
    }

    /// A linear module over `rows` rows; with `adapted` (its layer and module, when `x` holds
    /// every row of the pass), plus the update of each adapter in the pass that changes it.
    fn linear(
        &self,
        (l, host): (&B::Linear, &Linear),
        (x, rows): (&B::Act, usize),
        pass: &mut Pass<'_, '_, B>,
        adapted: Option<(usize, LoraModule)>,
    ) -> Result<B::Act> {
        self.backend.observe(pass.obs, &host.name, x, rows)?;
        let mut y = self.backend.linear(l, x, rows)?;
        if let (Some(at), Some(loras)) = (adapted, &pass.loras) {
            lora::apply(&self.backend, loras, at, x, &mut y)?;
        }
        Ok(y)
    }

    /// The attention block's output for the normed hidden states `x` (not yet added to the
    /// residual stream).
    fn attention_block(
        &self,
        i: usize,
        (layer, names): (&DeviceLayer<B>, &Layer),
        (x, n): (&B::Act, usize),
        step: &B::Step<'_>,
        pool: &mut B::Pool,
        pass: &mut Pass<'_, '_, B>,
    ) -> Result<B::Act> {
        let (b, c) = (&self.backend, self.config());
        let qkv = self.linear(
            (&layer.qkv, &names.qkv),
            (x, n),
            pass,
            Some((i, LoraModule::Qkv)),
        )?;
        let [mut q, mut k, v] =
            b.split_cols(&qkv, c.qkv_dim(), [c.q_dim(), c.kv_dim(), c.kv_dim()])?;
        if let Some((qn, kn)) = &layer.qk_norm {
            // A norm's rows are its weight's length: here, each head.
            q = b.norm(qn, &q, None)?;
            k = b.norm(kn, &k, None)?;
        }
        b.rope(&mut q, c.num_heads, i, step)?;
        b.rope(&mut k, c.num_kv_heads, i, step)?;
        let attn = b.attention(i, (&q, &k, &v), step, pool)?;
        self.linear(
            (&layer.o, &names.o),
            (&attn, n),
            pass,
            Some((i, LoraModule::O)),
        )
    }

    /// The MLP block's output for the normed hidden states `x`.
    fn mlp_block(
        &self,
        i: usize,
        (layer, names): (&DeviceLayer<B>, &Layer),
        x: &B::Act,
        n: usize,
        pass: &mut Pass<'_, '_, B>,
    ) -> Result<B::Act> {
        let b = &self.backend;
        match (&layer.mlp, &names.mlp) {
            (DeviceMlp::Dense { up, down }, Mlp::Dense { up: un, down: dn }) => {
                self.one_mlp([(up, un), (down, dn)], (x, n), pass, Some(i))
            }
            (
                DeviceMlp::Experts { router, experts },
                Mlp::Experts {
                    router: rn,
                    experts: en,
                },
            ) => {
                let h = self.config().hidden_size;
                let moe = self
                    .config()
                    .moe(i)
                    .expect("an experts layer has an MoE config");
                let logits = b.download(self.linear((router, rn), (x, n), pass, None)?)?;
                let mut out = b.zeros(n, h)?;
                // Each expert runs once over the tokens routed to it (its weights are read once
                // per step), in expert order, as transformers adds them.
                for (e, (rows, weights)) in route(moe, &logits, n).iter().enumerate() {
                    if rows.is_empty() {
                        continue;
                    }
                    let xe = b.gather_rows(x, rows, h)?;
                    let (up, down) = &experts[e];
                    let parts = [(up, &en[e].0), (down, &en[e].1)];
                    let ye = self.one_mlp(parts, (&xe, rows.len()), pass, None)?;
                    b.add_rows_scaled(&mut out, &ye, (rows, weights), h)?;
                }
                Ok(out)
            }
            _ => unreachable!("device layers are made from the host layers"),
        }
    }

    /// `down(act(up(x)))` over `n` rows; with `layer`, adapted where the pass's adapters
    /// change that layer's MLP (a dense MLP over every row of the pass).
    fn one_mlp(
        &self,
        [up, down]: [(&B::Linear, &Linear); 2],
        (x, n): (&B::Act, usize),
        pass: &mut Pass<'_, '_, B>,
        layer: Option<usize>,
    ) -> Result<B::Act> {
        let at = |m| layer.map(|i| (i, m));
        let up = self.linear(up, (x, n), pass, at(LoraModule::Up))?;
        let act = self.backend.activation(self.config().mlp, up, n)?;
        self.linear(down, (&act, n), pass, at(LoraModule::Down))
    }
}

/// Each expert's tokens and their weights: softmax over the router's logits, the top-k
/// experts of each token (ties to the lower index), renormalized where the config says.
fn route(moe: &MoeConfig, logits: &[f32], n: usize) -> Vec<(Vec<usize>, Vec<f32>)> {
    let mut per_expert = vec![(Vec::new(), Vec::new()); moe.num_experts];
    for (t, row) in logits.chunks_exact(moe.num_experts).enumerate().take(n) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = row.iter().map(|&l| (l - max).exp()).collect();
        let z: f32 = e.iter().sum();
        let mut order: Vec<usize> = (0..moe.num_experts).collect();
        order.sort_by(|&a, &b| e[b].total_cmp(&e[a]).then(a.cmp(&b)));
        let top = &order[..moe.top_k];
        let norm = match moe.normalize_top_k {
            true => top.iter().map(|&i| e[i] / z).sum::<f32>(),
            false => 1.0,
        };
        for &i in top {
            per_expert[i].0.push(t);
            per_expert[i].1.push(e[i] / z / norm);
        }
    }
    per_expert
}
