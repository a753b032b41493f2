//! Benchmarks only: see `benches/`. Run `cargo bench -p weir-bench` (timings on a 2-core
//! shared machine are noise; compare with care). Each bench reports rows per second.
