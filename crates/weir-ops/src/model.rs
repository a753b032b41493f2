//! ONNX models scored in Rust with tract (pure Rust: nothing to download at build or run time).
//!
//! A model takes one float32 matrix `[N, features]` (whatever batch dimension the file
//! declares, any number of rows is accepted) and gives one score per row (`[N]` or `[N, 1]`). Scoring runs on whole batches: the
//! engine's batches already adapt to the arrival rate (a quiet stream's are cut at once, a
//! burst's fill up), and `max_batch` caps one inference call.

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid as _;
use weir_core::{CoreError, Result};

/// A loaded, optimized model.
#[derive(Clone)]
pub struct OnnxModel {
    path: String,
    features: usize,
    plan: Arc<TypedRunnableModel>,
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel").field("path", &self.path).field("features", &self.features).finish()
    }
}

impl PartialEq for OnnxModel {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path && self.features == other.features
    }
}

fn model_err(path: &str, what: &str, e: impl std::fmt::Display) -> CoreError {
    CoreError::Config(format!("model `{path}`: {what}: {e}"))
}

impl OnnxModel {
    /// Loads and optimizes `path`, which must take `[N, features]` float32.
    ///
    /// # Errors
    /// A missing or unreadable file, an operator tract does not support, or an input that is
    /// not a matrix of `features` columns.
    pub fn load(path: &str, features: usize) -> Result<Self> {
        weir_core::ensure_config!(Path::new(path).is_file(), "model `{path}`: no such file");
        weir_core::ensure_config!(features >= 1, "model `{path}`: needs at least one input column");
        let mut model = onnx().model_for_path(path).map_err(|e| model_err(path, "cannot load", e))?;
        let inputs = model.input_outlets().map_err(|e| model_err(path, "inputs", e))?.len();
        weir_core::ensure_config!(inputs == 1, "model `{path}`: it has {inputs} inputs; one matrix input is supported");
        // A feature count the file declares must match; the batch dimension may be anything.
        let declared = model.input_fact(0).map_err(|e| model_err(path, "input", e))?;
        let width = declared
            .shape
            .dims()
            .last()
            .and_then(|d| d.concretize())
            .and_then(|d| d.as_i64())
            .and_then(|d| usize::try_from(d).ok());
        if let Some(w) = width.filter(|w| *w != features) {
            return Err(CoreError::Config(format!(
                "model `{path}`: it takes {w} features per row, but [N, {features}] was given (one column per `inputs` entry)"
            )));
        }
        let batch = model.symbols.sym("N");
        model
            .set_input_fact(0, f32::fact([batch.to_dim(), features.to_dim()]).into())
            .map_err(|e| model_err(path, "cannot take a [N, features] float32 input", e))?;
        let typed = model.into_typed().map_err(|e| {
            model_err(
                path,
                &format!("its input does not fit [N, {features}] float32 (one column per `inputs` entry)"),
                e,
            )
        })?;
        let plan = typed
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| model_err(path, "cannot prepare it", e))?;
        let m = Self { path: path.to_string(), features, plan };
        // One row through it now, so that a model with the wrong output shape fails at planning.
        m.score(&vec![0.0; features])
            .map_err(|e| CoreError::Config(format!("{e} (tried one row of [N, {features}] float32 at load)")))?;
        Ok(m)
    }

    /// The file it came from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Columns per row.
    pub fn features(&self) -> usize {
        self.features
    }

    /// Scores `rows` (row-major, `features` values per row): one score per row.
    ///
    /// # Errors
    /// A shape mismatch or a failure inside the model.
    pub fn score(&self, rows: &[f32]) -> Result<Vec<f32>> {
        let n = rows.len() / self.features;
        let input = Tensor::from_shape(&[n, self.features], rows).map_err(|e| model_err(&self.path, "input", e))?;
        let out = self.plan.run(tvec!(input.into())).map_err(|e| model_err(&self.path, "scoring failed", e))?;
        let first = out.first().ok_or_else(|| model_err(&self.path, "output", "the model gave no output"))?;
        let view =
            first.to_plain_array_view::<f32>().map_err(|e| model_err(&self.path, "output must be float32", e))?;
        weir_core::ensure_config!(
            view.len() == n,
            "model `{}`: gave {} values for {n} rows; expected one score per row ([N] or [N, 1])",
            self.path,
            view.len()
        );
        Ok(view.iter().copied().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_model() -> String {
        format!("{}/../../models/sensor_anomaly.onnx", env!("CARGO_MANIFEST_DIR"))
    }

    /// The model's formula (see scripts/make_onnx_model.py), in f64.
    fn expected(x: [f64; 4]) -> f64 {
        let (mean, std, w) = ([23.35, 45.0, 1013.0, 0.02], [1.6, 5.0, 2.0, 0.005], [1.0, 0.25, 0.25, 0.05]);
        let d2: f64 = (0..4).map(|i| w[i] * ((x[i] - mean[i]) / std[i]).powi(2)).sum();
        1.0 / (1.0 + (-(d2.sqrt() - 4.0)).exp())
    }

    #[test]
    fn the_repository_model_gives_its_known_scores_at_any_batch_size() {
        let m = OnnxModel::load(&repo_model(), 4).unwrap();
        let rows = [[23.35, 45.0, 1013.0, 0.02], [26.55, 50.0, 1015.0, 0.025], [38.35, 45.0, 1013.0, 0.4]];
        let flat: Vec<f32> = rows.iter().flatten().map(|v| *v as f32).collect();
        let got = m.score(&flat).unwrap();
        assert_eq!(got.len(), 3);
        for (r, g) in rows.iter().zip(&got) {
            assert!((f64::from(*g) - expected(*r)).abs() < 1e-5, "{r:?}: {g} vs {}", expected(*r));
        }
        assert!((got[0] - 0.017_986).abs() < 1e-5 && (got[1] - 0.133_9).abs() < 1e-3 && got[2] > 0.999);
        // One row, and many: the batch dimension is free.
        assert_eq!(m.score(&flat[4..8]).unwrap(), vec![got[1]]);
        let many: Vec<f32> = flat.iter().copied().cycle().take(3 * 4 * 700).collect();
        let scores = m.score(&many).unwrap();
        assert_eq!(scores.len(), 2100);
        assert_eq!(&scores[2097..], &got[..]);
    }

    #[test]
    fn a_model_that_does_not_fit_is_refused_at_load() {
        let err = OnnxModel::load(&repo_model(), 3).unwrap_err().to_string();
        assert!(err.contains("sensor_anomaly.onnx") && err.contains("[N, 3]"), "{err}");
        let err = OnnxModel::load("no/such/model.onnx", 4).unwrap_err().to_string();
        assert!(err.contains("model `no/such/model.onnx`: no such file"), "{err}");
    }
}
