//! Splits a whole-model engine into the rank files of a [`Mapping`] (TensorRT-LLM's layout):
//! QKV, gate/up and up by rows (each rank's heads and MLP columns), O and down by columns (their
//! biases on TP rank 0 only, since the ranks' outputs are summed), the embedding and head by
//! vocabulary rows, layers by stage; norms and routers whole. Each rank file holds only its
//! shard and is checksummed like a whole engine's.

use std::ops::Range;
use std::path::Path;

use trtllm_runtime::engine::{names, EngineConfig, EngineFile, EngineWriter, RankFile, TensorInfo};
use trtllm_runtime::parallel::{Mapping, Shard};
use trtllm_runtime::quant::{LayerQuantConfig, Quantizer, WeightFormat};
use trtllm_runtime::ModelConfig;

use crate::{BuildError, Result};

/// What one rank takes of a tensor.
#[derive(Debug, PartialEq)]
enum Take {
    Skip,
    Whole,
    /// These rows (of the module's output), in order.
    Rows(Vec<Range<usize>>),
    /// These input columns of every row, of the module's `.1`.
    Cols(Range<usize>, usize),
    /// Whole on TP rank 0, nothing elsewhere (a row-parallel module's bias).
    OnFirst,
}

/// Replaces the whole-model engine in `dir` by `mapping`'s rank files and returns the new
/// config.
pub(crate) fn shard_engine(
    dir: &Path,
    whole: EngineConfig,
    mapping: Mapping,
) -> Result<EngineConfig> {
    let model = &whole.model;
    let shards = (0..mapping.world_size)
        .map(|r| mapping.shard(model, r))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let rank0 = whole.ranks.first().ok_or_else(|| {
        BuildError::InvalidBuildConfig("the whole engine has no rank file".into())
    })?;
    // Moved aside so that rank 0's shard can take its name; still mapped until the end.
    let aside = RankFile {
        file: "whole.engine.tmp".into(),
        ..rank0.clone()
    };
    let io = |p: &Path, e| BuildError::io(p, e);
    std::fs::rename(dir.join(&rank0.file), dir.join(&aside.file))
        .map_err(|e| io(&dir.join(&rank0.file), e))?;
    let file = EngineFile::open(dir, &aside)?;
    let ranks = shards
        .iter()
        .map(|s| write_rank(dir, &file, model, s))
        .collect::<Result<Vec<_>>>()?;
    drop(file);
    std::fs::remove_file(dir.join(&aside.file)).map_err(|e| io(&dir.join(&aside.file), e))?;
    let cfg = EngineConfig {
        mapping,
        ranks,
        ..whole
    };
    cfg.write(dir)?;
    Ok(cfg)
}

fn write_rank(dir: &Path, file: &EngineFile, model: &ModelConfig, s: &Shard) -> Result<RankFile> {
    let mut w = EngineWriter::create_file(dir, &Mapping::rank_file(s.rank))?;
    for t in file.tensors() {
        let (prefix, suffix) = t.name.rsplit_once('.').unwrap_or((&t.name, ""));
        let take = match module_take(prefix, model, s) {
            // The quantization scales and permutations of the input side stay whole under a
            // row split; the output-side tensors are cut with the rows.
            Take::Rows(_) if !ROW_SUFFIXES.contains(&suffix) => Take::Whole,
            Take::Cols(..) if suffix == "bias" => Take::OnFirst,
            take => take,
        };
        let bytes = file.bytes(t);
        match take {
            Take::Skip => {}
            Take::OnFirst if s.tp_rank != 0 => {}
            Take::Whole | Take::OnFirst => {
                w.add_formatted(&t.name, (t.dtype, t.format), &t.shape, bytes)?
            }
            Take::Rows(rows) => {
                let (shape, data) = take_rows(t, bytes, &rows);
                w.add_formatted(&t.name, (t.dtype, t.format), &shape, &data)?;
            }
            Take::Cols(cols, of) => {
                let format = file
                    .info(&format!("{prefix}.weight"))
                    .and_then(|w| w.format);
                let (format, shape, data) = take_cols((t, bytes), (cols, of), format)?;
                w.add_formatted(&t.name, (t.dtype, format), &shape, &data)?;
            }
        }
    }
    Ok(w.finish_rank()?)
}

/// The tensors of a module that have one row per output row.
const ROW_SUFFIXES: &[&str] = &[
    "weight",
    "bias",
    "weight_scale",
    "weight_offset",
    "weight_block_scale",
];

/// What rank `s` takes of the module (or table) `prefix`.
fn module_take(prefix: &str, model: &ModelConfig, s: &Shard) -> Take {
    let (first, last) = (s.is_first_stage(), s.is_last_stage());
    let vocab = || Take::Rows(vec![s.vocab.clone()]);
    match prefix {
        names::EMBED_PREFIX if first || (last && model.tie_word_embeddings) => vocab(),
        names::LM_HEAD_PREFIX if last => vocab(),
        names::POS_EMBED_PREFIX if first => Take::Whole,
        names::FINAL_NORM if last => Take::Whole,
        _ => {
            let Some((i, part)) = prefix
                .strip_prefix("layers.")
                .and_then(|r| r.split_once('.'))
                .and_then(|(i, part)| Some((i.parse::<usize>().ok()?, part)))
            else {
                return Take::Skip;
            };
            if !s.layers.contains(&i) {
                return Take::Skip;
            }
            // An expert's module is cut as the dense one.
            let part = match part.strip_prefix(names::EXPERTS) {
                Some(rest) => rest
                    .trim_start_matches('.')
                    .split_once('.')
                    .map_or(rest, |r| r.1),
                None => part,
            };
            match part {
                names::QKV => Take::Rows(s.qkv_rows(model)),
                names::O => Take::Cols(s.o_cols(model), model.q_dim()),
                names::GATE_UP | names::UP => Take::Rows(s.mlp_in_rows(model, i)),
                names::DOWN => Take::Cols(s.inter(model, i), model.mlp_inter(i)),
                _ => Take::Whole,
            }
        }
    }
}

fn take_rows(t: &TensorInfo, bytes: &[u8], rows: &[Range<usize>]) -> (Vec<usize>, Vec<u8>) {
    let row_bytes = bytes.len() / t.shape[0].max(1);
    let mut data = Vec::new();
    for r in rows {
        data.extend_from_slice(&bytes[r.start * row_bytes..r.end * row_bytes]);
    }
    let mut shape = t.shape.clone();
    shape[0] = rows.iter().map(|r| r.len()).sum();
    (shape, data)
}

/// Why columns `cols` of `full` stored in `format` cannot be one rank's, if they cannot: a cut
/// inside a packed block, or inside a scale group (a group of the whole row is one scale per row
/// on every rank).
fn bad_cut(format: WeightFormat, cols: &Range<usize>, full: usize) -> Option<String> {
    let block = format.block();
    if !cols.start.is_multiple_of(block) || !cols.end.is_multiple_of(block) {
        return Some(format!("inside a block of {block} values"));
    }
    match format {
        WeightFormat::Int8 { group, .. } | WeightFormat::Int4 { group, .. } if group < full => {
            let ends = cols.end.is_multiple_of(group) || cols.end == full;
            (!cols.start.is_multiple_of(group) || !ends)
                .then(|| format!("inside a quantization group of {group}"))
        }
        _ => None,
    }
}

fn cut_error(name: &str, (cols, full): (&Range<usize>, usize), why: &str) -> BuildError {
    BuildError::InvalidBuildConfig(format!(
        "'{name}': tensor parallelism cuts its {full} input columns at {}..{}, {why}; use a \
         quantization group that divides each rank's columns, or fewer ranks",
        cols.start, cols.end
    ))
}

/// Fails, before any weight is read, a split that would cut a row-parallel module inside a block
/// or scale group of the format the build's quantization (`quant`) will store it in.
pub(crate) fn check_quantized_cuts(
    quant: &LayerQuantConfig,
    model: &ModelConfig,
    shards: &[Shard],
) -> Result<()> {
    for s in shards {
        for i in s.layers.clone() {
            let downs: Vec<String> = match model.moe(i) {
                None => vec![names::DOWN.into()],
                Some(m) => (0..m.num_experts)
                    .map(|e| format!("{}.{e}.{}", names::EXPERTS, names::DOWN))
                    .collect(),
            };
            for part in std::iter::once(names::O.to_string()).chain(downs) {
                let module = format!("layers.{i}.{part}");
                let Take::Cols(cols, full) = module_take(&module, model, s) else {
                    continue;
                };
                let format = Quantizer::planned_format(quant, &module, full);
                if let Some(why) = format.and_then(|f| bad_cut(f, &cols, full)) {
                    return Err(cut_error(&format!("{module}.weight"), (&cols, full), &why));
                }
            }
        }
    }
    Ok(())
}

/// Columns `cols` of `full_cols` of a row-parallel module's tensor `t`, whose weight is stored
/// in `format` (its quantized columns' grouping); the weight's format as this rank stores it.
fn take_cols(
    (t, bytes): (&TensorInfo, &[u8]),
    (cols, full_cols): (Range<usize>, usize),
    format: Option<WeightFormat>,
) -> Result<(Option<WeightFormat>, Vec<usize>, Vec<u8>)> {
    let cut = |why: &str| cut_error(&t.name, (&cols, full_cols), why);
    let suffix = t.name.rsplit_once('.').map_or("", |s| s.1);
    let (elems, new_format) = match (suffix, format) {
        ("weight", None) => (cols.clone(), None),
        ("weight", Some(f)) => {
            if let Some(why) = bad_cut(f, &cols, full_cols) {
                return Err(cut(&why));
            }
            // One scale per row (a group of the whole row) stays one: of this rank's columns.
            let mut here = f;
            if let WeightFormat::Int8 { group, .. } | WeightFormat::Int4 { group, .. } = &mut here {
                if *group >= full_cols {
                    *group = cols.len();
                }
            }
            (f.code_bytes(cols.start)..f.code_bytes(cols.end), Some(here))
        }
        ("weight_scale" | "weight_offset", Some(f)) => {
            if t.shape.get(1) == Some(&1) {
                (0..1, None)
            } else {
                let g = match f {
                    WeightFormat::Int8 { group, .. } | WeightFormat::Int4 { group, .. } => group,
                    _ => return Err(cut("a scale layout that cannot be split")),
                };
                if let Some(why) = bad_cut(f, &cols, full_cols) {
                    return Err(cut(&why));
                }
                (cols.start / g..cols.end.div_ceil(g), None)
            }
        }
        ("weight_block_scale", _) => (cols.start / 16..cols.end / 16, None),
        ("pre_quant_scale", _) => (cols.clone(), None),
        ("weight_global_scale" | "input_scale", _) => {
            return Ok((None, t.shape.clone(), bytes.to_vec()))
        }
        _ => {
            return Err(cut(
                "a tensor that cannot be split (act-order GPTQ's input_perm?)",
            ))
        }
    };
    let elem = t.dtype.size_bytes();
    let (rows, row_len) = match t.shape.as_slice() {
        [n] => (1, *n),
        [r, c] => (*r, *c),
        _ => return Err(cut("a tensor of more than two dimensions")),
    };
    let mut data = Vec::with_capacity(rows * elems.len() * elem);
    for row in bytes.chunks_exact(row_len * elem) {
        data.extend_from_slice(&row[elems.start * elem..elems.end * elem]);
    }
    let shape = match t.shape.len() {
        1 => vec![elems.len()],
        _ => vec![rows, elems.len()],
    };
    Ok((new_format, shape, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use trtllm_runtime::quant::DType;

    fn model() -> ModelConfig {
        serde_json::from_value(serde_json::json!({
            "architecture": "LlamaForCausalLM", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
            "head_dim": 16, "max_position_embeddings": 64, "norm": "rms_norm",
            "norm_eps": 1e-5, "mlp": "gated_silu", "position": {"type": "learned"},
            "tie_word_embeddings": true, "bos_token_id": null, "eos_token_ids": []
        }))
        .expect("config")
    }

    #[test]
    fn modules_are_cut_by_their_kind_and_stage() {
        let m = model();
        let map = Mapping::new(2, 2).unwrap();
        let (first, last) = (map.shard(&m, 1).unwrap(), map.shard(&m, 3).unwrap());
        assert_eq!(module_take("layers.3.qkv", &m, &first), Take::Skip);
        assert_eq!(
            module_take("layers.1.qkv", &m, &first),
            Take::Rows(vec![32..64, 80..96, 112..128])
        );
        assert_eq!(
            module_take("layers.1.o", &m, &first),
            Take::Cols(32..64, 64)
        );
        assert_eq!(
            module_take("layers.2.gate_up", &m, &last),
            Take::Rows(vec![128..256, 384..512])
        );
        assert_eq!(
            module_take("layers.2.down", &m, &last),
            Take::Cols(128..256, 256)
        );
        assert_eq!(module_take("layers.2.mlp_norm", &m, &last), Take::Whole);
        // Tied: the table is the head too, so the last stage holds its rows as well.
        assert_eq!(last.vocab, 50..100);
        let rows = Take::Rows(vec![last.vocab.clone()]);
        assert_eq!(module_take("embed", &m, &last), rows);
        assert_eq!(module_take("final_norm", &m, &first), Take::Skip);
        assert_eq!(module_take("pos_embed", &m, &first), Take::Whole);
    }

    fn info(name: &str, dtype: DType, shape: &[usize], format: Option<WeightFormat>) -> TensorInfo {
        let bytes = shape.iter().product::<usize>() * dtype.size_bytes();
        TensorInfo {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            offset: 0,
            bytes,
            format,
        }
    }

    #[test]
    fn quantized_columns_are_cut_between_groups_or_refused() {
        // int8 per channel: 2 rows of 64 codes; columns 32..64 keep each row's one scale.
        let f = WeightFormat::Int8 {
            group: 64,
            zero_point: false,
        };
        let codes: Vec<u8> = (0..128).map(|i| i as u8).collect();
        let t = info("layers.0.down.weight", DType::U8, &[2, 64], Some(f));
        let (format, shape, data) = take_cols((&t, &codes), (32..64, 64), Some(f)).unwrap();
        assert_eq!(shape, vec![2, 32]);
        assert_eq!(data[..2], [32, 33]);
        assert_eq!(data[32], 96);
        let local = WeightFormat::Int8 {
            group: 32,
            zero_point: false,
        };
        assert_eq!(format, Some(local));
        // int4 in groups of 32: a cut at column 16 splits a block.
        let f = WeightFormat::Int4 {
            group: 32,
            zero_point: true,
        };
        let t = info("layers.0.o.weight", DType::U8, &[1, 32], Some(f));
        let e = take_cols((&t, &[0u8; 32]), (16..64, 64), Some(f)).unwrap_err();
        assert!(e.to_string().contains("inside a block of 32"), "{e}");
        let t = info("layers.0.o.input_perm", DType::F32, &[64], None);
        let e = take_cols((&t, &[0u8; 256]), (0..32, 64), Some(f)).unwrap_err();
        assert!(e.to_string().contains("input_perm"), "{e}");
    }

    #[test]
    fn quantized_cuts_are_checked_before_any_weight_is_read() {
        use trtllm_runtime::quant::{QuantAlgo, QuantConfig};
        let mut m = model();
        m.intermediate_size = 160; // TP 2: 96 + 64 columns, in units of 32
        let shards: Vec<Shard> = (0..2)
            .map(|r| Mapping::new(2, 1).unwrap().shard(&m, r).unwrap())
            .collect();
        let w4 = |group_size, exclude: Option<&str>| {
            LayerQuantConfig::uniform(QuantConfig {
                group_size,
                exclude_modules: exclude.map(|e| vec![e.to_string()]),
                ..QuantConfig::for_algo(QuantAlgo::W4A16)
            })
        };
        let e = check_quantized_cuts(&w4(128, None), &m, &shards).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("'layers.0.down.weight'") && e.contains("group of 128"),
            "{e}"
        );
        // Groups that divide each rank's columns, a module kept float, one scale per row.
        check_quantized_cuts(&w4(32, None), &m, &shards).unwrap();
        check_quantized_cuts(&w4(128, Some("down")), &m, &shards).unwrap();
        let w8 = LayerQuantConfig::uniform(QuantConfig::for_algo(QuantAlgo::W8A16));
        check_quantized_cuts(&w8, &m, &shards).unwrap();
    }
}
