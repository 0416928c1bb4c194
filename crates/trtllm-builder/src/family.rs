//! Model families as data: for each, where every engine tensor comes from in the checkpoint.

use trtllm_runtime::{MlpKind, ModelConfig};

/// The families the builder maps onto the decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    /// Qwen2's layout without q/k/v biases, plus per-head q/k RMSNorms.
    Qwen3,
    /// Llama's decoder with q/k/v and gate/up already fused in the checkpoint.
    Phi3,
    /// Mistral's attention with a sparse mixture of gated-SiLU experts in every layer.
    Mixtral,
    /// Qwen3's attention with a mixture of experts in the layers the config names.
    Qwen3Moe,
    /// Pre- and post-norms around attention and MLP, `(1 + w)` RMSNorm weights (stored as w),
    /// GeGLU, soft-capping, alternating sliding windows.
    Gemma2,
    /// Gemma 2's layout with (1 + w) q/k norms and its own RoPE base on sliding-window layers.
    Gemma3,
    Gpt2,
}

/// Gemma 3's RoPE base on its sliding-window layers, where a config does not say.
pub const GEMMA3_LOCAL_THETA: f32 = 10_000.0;

/// Gemma's layer pattern: every `pattern`-th layer global, the others windowed (one flag per
/// layer, true for windowed).
pub fn gemma_sliding_layers(layers: usize, pattern: usize) -> Vec<bool> {
    let pattern = pattern.max(1);
    (0..layers).map(|i| (i + 1) % pattern != 0).collect()
}

impl Family {
    /// Layers per Gemma pattern (one global among them) where a config does not say.
    pub fn gemma_pattern(self) -> usize {
        if self == Family::Gemma2 {
            2
        } else {
            6
        }
    }

    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }

    /// Per-head RMSNorms on queries and keys.
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Family::Qwen3 | Family::Qwen3Moe | Family::Gemma3)
    }
}

pub const SUPPORTED: &str =
    "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, MixtralForCausalLM, Qwen3MoeForCausalLM, GPT2LMHeadModel; GGUF: llama, mistral, qwen2, gemma3, gpt2";

/// One source matrix of a (possibly fused) engine linear layer.
#[derive(Clone, Debug)]
pub struct Part {
    pub weight: String,
    /// Loaded when the checkpoint has it.
    pub bias: String,
    /// Stored `[in × out]` (GPT-2's Conv1D) rather than `[out × in]`.
    pub transposed: bool,
    /// Rows are in llama.cpp's interleaved rotary order for this many heads and must be put back.
    pub unpermute_heads: Option<usize>,
}

/// An engine linear layer: its parts' rows stacked in order.
pub type LinearSpec = Vec<Part>;

#[derive(Clone, Debug)]
pub struct NormSpec {
    pub weight: String,
    pub bias: String,
    /// Added to each weight when written: Gemma's RMSNorm multiplies by `1 + w`.
    pub offset: f32,
}

#[derive(Clone, Debug)]
pub struct LayerSpec {
    pub attn_norm: NormSpec,
    pub qkv: LinearSpec,
    /// Per-head query and key norms (Qwen3).
    pub qk_norm: Option<(NormSpec, NormSpec)>,
    pub o: LinearSpec,
    pub mlp_norm: NormSpec,
    /// Norms of the attention and MLP outputs before the residual add (Gemma 2).
    pub post_norms: Option<(NormSpec, NormSpec)>,
    /// `[gate ; up]` for gated MLPs, `[up]` otherwise (empty with experts).
    pub up: LinearSpec,
    pub down: LinearSpec,
    /// A mixture of experts instead of `up`/`down`: the router matrix and each expert's
    /// `[gate ; up]` and down.
    pub experts: Option<(String, Vec<(LinearSpec, LinearSpec)>)>,
}

#[derive(Clone, Debug)]
pub struct ModelSpec {
    pub embed: String,
    pub pos_embed: Option<String>,
    pub final_norm: NormSpec,
    pub lm_head: String,
    pub layers: Vec<LayerSpec>,
}

fn part(weight: String) -> Part {
    let bias = weight
        .strip_suffix(".weight")
        .map_or_else(|| format!("{weight}.bias"), |b| format!("{b}.bias"));
    Part {
        weight,
        bias,
        transposed: false,
        unpermute_heads: None,
    }
}

fn norm(prefix: &str) -> NormSpec {
    NormSpec {
        weight: format!("{prefix}.weight"),
        bias: format!("{prefix}.bias"),
        offset: 0.0,
    }
}

fn gemma_norm(prefix: &str) -> NormSpec {
    NormSpec {
        offset: 1.0,
        ..norm(prefix)
    }
}

/// A mixture-of-experts layer's router and each expert's `[gate ; up]` and down.
fn experts_spec(family: Family, i: usize, n: usize) -> (String, Vec<(LinearSpec, LinearSpec)>) {
    let (block, [gate, up, down]) = match family {
        Family::Mixtral => ("block_sparse_moe", ["w1", "w3", "w2"]),
        _ => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
    };
    let moe = format!("model.layers.{i}.{block}");
    let w = |e: usize, s: &str| part(format!("{moe}.experts.{e}.{s}.weight"));
    let experts = (0..n)
        .map(|e| (vec![w(e, gate), w(e, up)], vec![w(e, down)]))
        .collect();
    (format!("{moe}.gate.weight"), experts)
}

/// Hugging Face tensor names.
pub fn hf_spec(family: Family, cfg: &ModelConfig) -> ModelSpec {
    match family {
        Family::Llama
        | Family::Mistral
        | Family::Qwen2
        | Family::Qwen3
        | Family::Phi3
        | Family::Mixtral
        | Family::Qwen3Moe
        | Family::Gemma2
        | Family::Gemma3 => {
            let gemma = family.is_gemma();
            let any_norm = |name: &str| if gemma { gemma_norm(name) } else { norm(name) };
            let layer = |i: usize| {
                let p = |s: &str| part(format!("model.layers.{i}.{s}.weight"));
                let n = |s: &str| any_norm(&format!("model.layers.{i}.{s}"));
                // Phi-3 stores q/k/v and gate/up fused, in the engine's row order already.
                let (qkv, up) = match family {
                    Family::Phi3 => (vec![p("self_attn.qkv_proj")], vec![p("mlp.gate_up_proj")]),
                    _ => (
                        vec![
                            p("self_attn.q_proj"),
                            p("self_attn.k_proj"),
                            p("self_attn.v_proj"),
                        ],
                        vec![p("mlp.gate_proj"), p("mlp.up_proj")],
                    ),
                };
                LayerSpec {
                    attn_norm: n("input_layernorm"),
                    qkv,
                    qk_norm: family
                        .has_qk_norm()
                        .then(|| (n("self_attn.q_norm"), n("self_attn.k_norm"))),
                    o: vec![p("self_attn.o_proj")],
                    // Gemma's post_attention_layernorm norms the attention output; its MLP's
                    // input norm is pre_feedforward_layernorm.
                    mlp_norm: n(match gemma {
                        true => "pre_feedforward_layernorm",
                        false => "post_attention_layernorm",
                    }),
                    post_norms: gemma.then(|| {
                        (
                            n("post_attention_layernorm"),
                            n("post_feedforward_layernorm"),
                        )
                    }),
                    up,
                    down: vec![p("mlp.down_proj")],
                    experts: cfg.moe(i).map(|m| experts_spec(family, i, m.num_experts)),
                }
            };
            ModelSpec {
                embed: "model.embed_tokens.weight".into(),
                pos_embed: None,
                final_norm: any_norm("model.norm"),
                lm_head: "lm_head.weight".into(),
                layers: (0..cfg.num_layers).map(layer).collect(),
            }
        }
        Family::Gpt2 => {
            let layer = |i: usize| {
                let conv = |s: &str| Part {
                    transposed: true,
                    ..part(format!("transformer.h.{i}.{s}.weight"))
                };
                LayerSpec {
                    attn_norm: norm(&format!("transformer.h.{i}.ln_1")),
                    qkv: vec![conv("attn.c_attn")],
                    qk_norm: None,
                    o: vec![conv("attn.c_proj")],
                    mlp_norm: norm(&format!("transformer.h.{i}.ln_2")),
                    post_norms: None,
                    up: vec![conv("mlp.c_fc")],
                    down: vec![conv("mlp.c_proj")],
                    experts: None,
                }
            };
            ModelSpec {
                embed: "transformer.wte.weight".into(),
                pos_embed: Some("transformer.wpe.weight".into()),
                final_norm: norm("transformer.ln_f"),
                lm_head: "lm_head.weight".into(),
                layers: (0..cfg.num_layers).map(layer).collect(),
            }
        }
    }
}

/// GGUF tensor names (llama.cpp's convention).
pub fn gguf_spec(family: Family, cfg: &ModelConfig) -> ModelSpec {
    // llama.cpp permutes Llama/Mistral Q and K rows for its interleaved RoPE; Qwen2 it leaves alone.
    let permuted = matches!(family, Family::Llama | Family::Mistral);
    let gemma = family.is_gemma();
    let layer = |i: usize| {
        let p = |s: &str| part(format!("blk.{i}.{s}.weight"));
        // llama.cpp's converter folds Gemma's `1 + w` into the norm weights: no offset here.
        let n = |s: &str| norm(&format!("blk.{i}.{s}"));
        let rope = |s: &str, heads: usize| Part {
            unpermute_heads: permuted.then_some(heads),
            ..p(s)
        };
        let (qkv, up) = match cfg.mlp {
            MlpKind::GatedSilu | MlpKind::GatedGeluTanh => (
                vec![
                    rope("attn_q", cfg.num_heads),
                    rope("attn_k", cfg.num_kv_heads),
                    p("attn_v"),
                ],
                vec![p("ffn_gate"), p("ffn_up")],
            ),
            MlpKind::GeluTanh => (vec![p("attn_qkv")], vec![p("ffn_up")]),
        };
        LayerSpec {
            attn_norm: n("attn_norm"),
            qkv,
            qk_norm: family
                .has_qk_norm()
                .then(|| (n("attn_q_norm"), n("attn_k_norm"))),
            o: vec![p("attn_output")],
            mlp_norm: n("ffn_norm"),
            post_norms: gemma.then(|| (n("post_attention_norm"), n("post_ffw_norm"))),
            up,
            down: vec![p("ffn_down")],
            experts: None,
        }
    };
    ModelSpec {
        embed: "token_embd.weight".into(),
        pos_embed: (family == Family::Gpt2).then(|| "position_embd.weight".into()),
        final_norm: norm("output_norm"),
        lm_head: "output.weight".into(),
        layers: (0..cfg.num_layers).map(layer).collect(),
    }
}
