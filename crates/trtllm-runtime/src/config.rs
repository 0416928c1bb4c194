//! The family-independent description of a decoder. A model family (Llama, Qwen2, GPT-2, ...)
//! is nothing but a mapping from its checkpoint config onto this struct; the builder does that.

use serde::{Deserialize, Serialize};
use trtllm_quant::kernels::cpu::{AttentionShape, RopeScaling};

use crate::{Result, RuntimeError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    RmsNorm,
    /// LayerNorm with a bias.
    LayerNorm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpKind {
    /// `down(silu(gate(x)) · up(x))`, gate and up fused into one matrix.
    GatedSilu,
    /// `down(gelu_tanh(up(x)))`.
    GeluTanh,
    /// `down(gelu_tanh(gate(x)) · up(x))` (Gemma's GeGLU), gate and up fused like GatedSilu.
    GatedGeluTanh,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PositionKind {
    /// Rotary embedding on the first `rotary_dim` dimensions of every query and key head.
    Rope {
        theta: f32,
        rotary_dim: usize,
        scaling: RopeScaling,
    },
    /// A learned `[max_position_embeddings × hidden]` table added to the token embeddings.
    Learned,
}

/// A sparse mixture of experts in place of the MLP (Mixtral, Qwen3-MoE): each token's MLP output
/// is the weighted sum of `top_k` of `num_experts` gated MLPs, chosen by a router.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// The chosen experts' softmax weights are renormalized to sum to 1.
    pub normalize_top_k: bool,
    /// Each expert's intermediate size; `None`: the dense `intermediate_size` (Mixtral).
    #[serde(default)]
    pub expert_intermediate_size: Option<usize>,
    /// Layers that keep a dense MLP of `intermediate_size` (Qwen3-MoE's `mlp_only_layers` and
    /// `decoder_sparse_step`), one flag per layer; empty: none.
    #[serde(default)]
    pub dense_layers: Vec<bool>,
}

/// What sets the families apart beyond sizes and kinds; everything off is Llama. Stored flat in
/// the engine's config (older engines without a field read it as off).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Features {
    /// An RMSNorm over each query and key head (weights `[head_dim]`) before RoPE.
    pub qk_norm: bool,
    /// Sliding-window attention: a windowed layer's query at position `i` sees keys
    /// `i + 1 - sliding_window ..= i`.
    pub sliding_window: Option<usize>,
    /// Which layers are windowed (one flag per layer); empty: every layer, when
    /// `sliding_window` is set.
    pub sliding_layers: Vec<bool>,
    /// Attention scores soft-capped at this value (Gemma 2): `cap · tanh(s / cap)`.
    pub attn_logit_softcap: Option<f32>,
    /// Output logits soft-capped the same way.
    pub final_logit_softcap: Option<f32>,
    /// The attention scale is `query_pre_attn_scalar^-½` instead of `head_dim^-½`.
    pub query_pre_attn_scalar: Option<f32>,
    /// Token embeddings multiplied by this (Gemma: √hidden).
    pub embed_scale: Option<f32>,
    /// A norm on the attention output and one on the MLP output before each joins the residual
    /// stream (Gemma 2/3), besides the usual pre-norms.
    pub post_norms: bool,
    pub moe: Option<MoeConfig>,
    /// The rotary base and scaling of sliding-window layers where they differ from the global
    /// ones (Gemma 3: local theta 10 000, global 1 000 000 and scaled).
    pub local_rope: Option<LocalRope>,
}

/// RoPE of the sliding-window layers; the rotated dimensions are the global ones.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalRope {
    pub theta: f32,
    pub scaling: RopeScaling,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The checkpoint's architecture name, for display.
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub norm: NormKind,
    pub norm_eps: f32,
    pub mlp: MlpKind,
    pub position: PositionKind,
    pub tie_word_embeddings: bool,
    /// What sets this family apart beyond sizes and kinds (all off for Llama).
    #[serde(flatten)]
    pub features: Features,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// On a rank of a pipeline-split engine, the layers its stage computes (its KV pool holds
    /// only theirs); `None`: every layer. Set by `Shard::model`, never stored.
    #[serde(skip)]
    pub stage_layers: Option<std::ops::Range<usize>>,
}

impl ModelConfig {
    /// Most layers a config may have (far beyond any published model); loaders check it before
    /// sizing per-layer tables.
    pub const MAX_LAYERS: usize = 1 << 10;

    /// Rejects configs the decoder cannot run, naming the field.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(RuntimeError::InvalidConfig(format!(
                    "{name} must be positive"
                )));
            }
        }
        // Far beyond any published model: a value past these is a corrupt or hostile config,
        // caught before anything is sized by it (expert tables included: published models
        // have at most a few hundred experts).
        let moe = self.features.moe.as_ref();
        let bounded = [
            ("vocab_size", self.vocab_size, 1 << 22),
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 19),
            ("num_layers", self.num_layers, Self::MAX_LAYERS),
            ("num_heads", self.num_heads, 1 << 10),
            ("num_kv_heads", self.num_kv_heads, 1 << 10),
            ("head_dim", self.head_dim, 1 << 12),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 24,
            ),
            ("num_experts", moe.map_or(0, |m| m.num_experts), 1 << 12),
            (
                "moe_intermediate_size",
                moe.and_then(|m| m.expert_intermediate_size).unwrap_or(0),
                1 << 19,
            ),
        ];
        for (name, v, most) in bounded {
            if v > most {
                return Err(RuntimeError::InvalidConfig(format!(
                    "{name} = {v} is out of range (at most {most})"
                )));
            }
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return Err(RuntimeError::InvalidConfig(format!(
                "the norm epsilon {} must be a finite non-negative number",
                self.norm_eps
            )));
        }
        if let PositionKind::Rope { theta, .. } = self.position {
            if !(theta.is_finite() && theta > 0.0) {
                return Err(RuntimeError::InvalidConfig(format!(
                    "rope_theta {theta} must be a finite positive number"
                )));
            }
        }
        let ids = self.bos_token_id.iter().chain(&self.eos_token_ids);
        if let Some(id) = ids.copied().find(|&id| id as usize >= self.vocab_size) {
            return Err(RuntimeError::InvalidConfig(format!(
                "special token id {id} is outside the vocabulary ({} tokens)",
                self.vocab_size
            )));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(RuntimeError::InvalidConfig(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            )));
        }
        if let Some(m) = moe {
            if m.top_k == 0 || m.top_k > m.num_experts {
                return Err(RuntimeError::InvalidConfig(format!(
                    "num_experts_per_tok ({}) must be between 1 and the number of experts ({})",
                    m.top_k, m.num_experts
                )));
            }
            if !m.dense_layers.is_empty() && m.dense_layers.len() != self.num_layers {
                return Err(RuntimeError::InvalidConfig(format!(
                    "{} dense-MLP layer flags for {} layers",
                    m.dense_layers.len(),
                    self.num_layers
                )));
            }
            if m.expert_intermediate_size == Some(0) {
                return Err(RuntimeError::InvalidConfig(
                    "moe_intermediate_size must be positive".into(),
                ));
            }
        }
        if self.features.sliding_window == Some(0) {
            return Err(RuntimeError::InvalidConfig(
                "sliding_window must be positive".into(),
            ));
        }
        if !self.features.sliding_layers.is_empty()
            && self.features.sliding_layers.len() != self.num_layers
        {
            return Err(RuntimeError::InvalidConfig(format!(
                "{} sliding-window layer flags for {} layers",
                self.features.sliding_layers.len(),
                self.num_layers
            )));
        }
        if self.features.local_rope.is_some() && !matches!(self.position, PositionKind::Rope { .. })
        {
            return Err(RuntimeError::InvalidConfig(
                "a local RoPE for sliding-window layers needs a rotary model".into(),
            ));
        }
        if let PositionKind::Rope { rotary_dim, .. } = self.position {
            if rotary_dim == 0 || rotary_dim % 2 != 0 || rotary_dim > self.head_dim {
                return Err(RuntimeError::InvalidConfig(format!(
                    "rotary dimension {rotary_dim} must be even and at most head_dim ({})",
                    self.head_dim
                )));
            }
        }
        Ok(())
    }

    /// Heads, the softmax scale 1/√head_dim and the window (if any) of attention layer `layer`.
    pub fn attention_shape(&self, layer: usize) -> AttentionShape {
        AttentionShape {
            n_heads: self.num_heads,
            n_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            scale: 1.0
                / self
                    .features
                    .query_pre_attn_scalar
                    .unwrap_or(self.head_dim as f32)
                    .sqrt(),
            window: self.window(layer),
            softcap: self.features.attn_logit_softcap,
        }
    }

    /// The longest sequence the model is meant for: `max_position_embeddings`, stretched by
    /// RoPE scalings that extend the context past it (as vLLM derives its max_model_len).
    pub fn context_len(&self) -> usize {
        match &self.position {
            PositionKind::Rope { scaling, .. } => scaling.context_len(self.max_position_embeddings),
            PositionKind::Learned => self.max_position_embeddings,
        }
    }

    /// Whether a key's rotation depends on its sequence's length when it was computed (dynamic
    /// NTK, LongRoPE), so that cached keys cannot be shared between sequences.
    pub fn rope_depends_on_length(&self) -> bool {
        let PositionKind::Rope { scaling, .. } = &self.position else {
            return false;
        };
        scaling.depends_on_length()
            || self
                .features
                .local_rope
                .as_ref()
                .is_some_and(|l| l.scaling.depends_on_length())
    }

    /// The mixture of experts of layer `layer`, unless it has a dense MLP.
    pub fn moe(&self, layer: usize) -> Option<&MoeConfig> {
        self.features
            .moe
            .as_ref()
            .filter(|m| !m.dense_layers.get(layer).copied().unwrap_or(false))
    }

    /// The intermediate size of layer `layer`'s MLP, or of each of its experts.
    pub fn mlp_inter(&self, layer: usize) -> usize {
        self.moe(layer)
            .and_then(|m| m.expert_intermediate_size)
            .unwrap_or(self.intermediate_size)
    }

    /// Whether this rank computes layer `layer` (see `stage_layers`).
    pub fn computes_layer(&self, layer: usize) -> bool {
        self.stage_layers
            .as_ref()
            .is_none_or(|r| r.contains(&layer))
    }

    /// The layers' KV groups: one per distinct attention span.
    pub fn kv_groups(&self) -> crate::kv_cache::KvGroups {
        let spans: Vec<Option<usize>> = (0..self.num_layers).map(|l| self.window(l)).collect();
        let mut windows = spans.clone();
        // None (every key) sorts first.
        windows.sort();
        windows.dedup();
        let of_layer = spans
            .iter()
            .map(|s| windows.iter().position(|w| w == s).unwrap_or(0))
            .collect();
        crate::kv_cache::KvGroups { windows, of_layer }
    }

    /// The sliding window of layer `layer`, if it has one.
    pub fn window(&self, layer: usize) -> Option<usize> {
        let windowed = self
            .features
            .sliding_layers
            .get(layer)
            .copied()
            .unwrap_or(true);
        self.features.sliding_window.filter(|_| windowed)
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    pub fn qkv_dim(&self) -> usize {
        self.q_dim() + 2 * self.kv_dim()
    }

    /// The engine tensor part holding layer `layer`'s MLP input projection (each expert's, with
    /// experts) and its row count: fused `gate_up` (gate rows, then up rows) for gated MLPs,
    /// plain `up` otherwise.
    pub fn mlp_in(&self, layer: usize) -> (&'static str, usize) {
        let inter = self.mlp_inter(layer);
        match self.mlp {
            MlpKind::GatedSilu | MlpKind::GatedGeluTanh => {
                (crate::engine::names::GATE_UP, 2 * inter)
            }
            MlpKind::GeluTanh => (crate::engine::names::UP, inter),
        }
    }
}
