//! Calibration for the algorithms that need activations (AWQ, GPTQ, SmoothQuant, FP8): the
//! checkpoint is first built as a float32 engine in a scratch directory beside the output, the
//! runtime runs it over the calibration text, and every linear module's inputs are recorded.
//! The scratch engine is removed afterwards, whatever happens.

use std::path::{Path, PathBuf};

use trtllm_runtime::quant::{CalibNeeds, Calibration, DType, LayerQuantConfig};
use trtllm_runtime::{BuildConfig, ModelConfig, Session};

use crate::build::{write_engine, BuildProgress};
use crate::family::ModelSpec;
use crate::{BuildError, Checkpoint, Result};

/// The calibration text when the config names none: the GNU GPL v3, whose terms allow verbatim
/// copies. Any long English text does; it only has to differ from what is evaluated.
const DEFAULT_TEXT: &str = include_str!("../data/calibration.txt");

/// Fewer tokens than this cannot give stable per-channel statistics.
const MIN_TOKENS: usize = 64;

/// Where the calibration text comes from and how it becomes tokens.
pub(crate) struct CalibrationInput<'a> {
    /// The model's tokenizer (tokenizer.json contents).
    pub tokenizer_json: &'a [u8],
    pub tokenizer_path: &'a Path,
}

/// Statistics of the float model's activations over the configured calibration text.
pub(crate) fn calibrate(
    ck: &dyn Checkpoint,
    spec: &ModelSpec,
    model: &ModelConfig,
    config: &BuildConfig,
    input: CalibrationInput<'_>,
    output: &Path,
    progress: BuildProgress,
) -> Result<Calibration> {
    let quant = &config.quant.base;
    let tokens = calibration_tokens(&config.quant, &input)?;
    let scratch = Scratch(scratch_dir(output));
    let float = BuildConfig {
        dtype: Some(DType::F32),
        quant: LayerQuantConfig::default(),
        keep_quantized: false,
        ..config.clone()
    };
    progress(0, 1, "calibration engine");
    write_engine(
        ck,
        spec,
        model.clone(),
        &float,
        &scratch.0,
        None,
        &mut |_, _, _| {},
    )?;
    let runner = Session::open(&scratch.0)?.model_runner()?;
    let seq_len = quant.calib_max_seq_length.clamp(1, runner.max_seq_len());
    let seqs: Vec<&[u32]> = tokens.chunks(seq_len).take(quant.calib_size).collect();
    let total: usize = seqs.iter().map(|s| s.len()).sum();
    let mut calibration = Calibration::new(CalibNeeds::of(&config.quant), total);
    for (i, seq) in seqs.iter().enumerate() {
        progress(i, seqs.len(), "calibrating");
        runner.observe(seq, &mut calibration)?;
    }
    Ok(calibration)
}

fn calibration_tokens(quant: &LayerQuantConfig, input: &CalibrationInput<'_>) -> Result<Vec<u32>> {
    let (text, source) = match &quant.base.calib_dataset {
        Some(path) => (
            std::fs::read_to_string(path).map_err(|e| BuildError::io(path, e))?,
            path.clone(),
        ),
        None => (
            DEFAULT_TEXT.to_string(),
            "the built-in calibration text".into(),
        ),
    };
    let tokenizer = tokenizers::Tokenizer::from_bytes(input.tokenizer_json)
        .map_err(|e| BuildError::checkpoint(input.tokenizer_path, e.to_string()))?;
    let ids = tokenizer
        .encode(text, false)
        .map_err(|e| BuildError::checkpoint(input.tokenizer_path, e.to_string()))?
        .get_ids()
        .to_vec();
    if ids.len() < MIN_TOKENS {
        return Err(BuildError::InvalidBuildConfig(format!(
            "calib_dataset: {source} has {} tokens; calibration needs at least {MIN_TOKENS}",
            ids.len()
        )));
    }
    Ok(ids)
}

/// `{output}.calibration`: beside the output, so a failed build leaves the output untouched.
fn scratch_dir(output: &Path) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(".calibration");
    output.with_file_name(name)
}

/// Removes the scratch engine when calibration ends, successfully or not.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
