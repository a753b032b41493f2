//! Rows per second an ONNX model scores at batch sizes 1, 64 and 1024 (scripts/bench-alerts.sh).
//!
//! Usage: `onnx_rate MODEL.onnx [FEATURES]` (default 4 features). Each size runs for 2 s after
//! a warm-up; inputs are generator-like readings.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use weir_ops::model::OnnxModel;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: onnx_rate MODEL.onnx [FEATURES]")?;
    let features: usize = args.next().map_or(Ok(4), |f| f.parse())?;
    let model = OnnxModel::load(&path, features)?;
    let row = [23.0f32, 45.0, 1013.0, 0.02];
    println!("| batch | rows/s | µs per call |");
    println!("|---|---|---|");
    for batch in [1usize, 64, 1024] {
        let input: Vec<f32> =
            (0..batch * features).map(|i| row[i % features % row.len()] + (i % 7) as f32 * 0.1).collect();
        for _ in 0..100 {
            model.score(&input)?;
        }
        let (start, mut calls) = (Instant::now(), 0u64);
        while start.elapsed() < Duration::from_secs(2) {
            std::hint::black_box(model.score(&input)?);
            calls += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        println!("| {batch} | {:.0} | {:.1} |", (calls as f64 * batch as f64) / secs, secs * 1e6 / calls as f64);
    }
    Ok(())
}
