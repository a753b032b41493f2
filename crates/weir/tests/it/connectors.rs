//! Sources and sinks end to end: CSV, MessagePack, globs, following a growing file, the
//! generator.

use std::io::Write as _;
use std::time::Duration;

use weir::prelude::*;

use crate::common::*;

fn schema() -> SchemaSpec {
    SchemaSpec::new(vec![
        FieldSpec::new("device_id", FieldType::String),
        FieldSpec::new("ts", FieldType::Int64),
        FieldSpec::new_struct("readings", vec![FieldSpec::new("temp", FieldType::Float64)]),
    ])
}

fn pipeline(path: &str, format: FormatSpec, out: &std::path::Path, dead: &std::path::Path) -> Pipeline {
    let mut src = SourceConfig::new("in", SourceConnector::File(FileSourceSettings::new(path, format)));
    src.schema = Some(schema());
    src.event_time = Some(EventTimeConfig::new("ts", TimeFormat::Millis));
    let mut p = Pipeline::new("t");
    p.source(src)
        .filter("hot", "readings.temp > 25.0")
        .select("cols", ["device_id", "ts", "readings.temp AS temp"])
        .sink(SinkConfig::new(
            "out",
            SinkConnector::File(FileSinkSettings { path: out.display().to_string(), format: FormatSpec::Json }),
        ))
        .dead_letters(dead.display().to_string());
    p
}

/// Writes the 3k fixture in another format through a Weir pipeline, then reads it back.
#[test]
fn csv_and_msgpack_round_trip_through_files() {
    let dir = tempfile::tempdir().unwrap();
    for (name, format) in [("csv", FormatSpec::Csv(CsvOptions::default())), ("msgpack", FormatSpec::MsgPack)] {
        let converted = dir.path().join(format!("in.{name}"));
        let mut conv = SourceConfig::new(
            "in",
            SourceConnector::File(FileSourceSettings::new(
                data("sensors-3k.jsonl").display().to_string(),
                FormatSpec::Json,
            )),
        );
        conv.schema = Some(schema());
        let mut p = Pipeline::new("convert");
        p.source(conv)
            .sink(SinkConfig::new(
                "out",
                SinkConnector::File(FileSinkSettings { path: converted.display().to_string(), format }),
            ))
            .dead_letters(dir.path().join("d0").display().to_string());
        rt().block_on(p.build().unwrap().run(&RunOptions { workers: Some(1), ..Default::default() })).unwrap();

        let out = dir.path().join(format!("out-{name}.jsonl"));
        let p = pipeline(&converted.display().to_string(), format, &out, &dir.path().join("d1"));
        for workers in [1, 2] {
            rt().block_on(p.build().unwrap().run(&RunOptions { workers: Some(workers), ..Default::default() }))
                .unwrap();
            assert_same_rows(
                read_jsonl(&data("w2-expected.jsonl")),
                read_jsonl(&out),
                &format!("{name}, {workers} workers"),
            );
        }
    }
}

#[test]
fn a_glob_reads_every_matching_file() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(data("sensors-3k.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for (i, part) in lines.chunks(1000).enumerate() {
        std::fs::write(dir.path().join(format!("part-{i}.jsonl")), part.join("\n") + "\n").unwrap();
    }
    let out = dir.path().join("out.jsonl");
    let p = pipeline(&format!("{}/part-*.jsonl", dir.path().display()), FormatSpec::Json, &out, &dir.path().join("d"));
    rt().block_on(p.build().unwrap().run(&RunOptions { workers: Some(2), ..Default::default() })).unwrap();
    assert_same_rows(read_jsonl(&data("w2-expected.jsonl")), read_jsonl(&out), "glob");
}

#[test]
fn follow_mode_picks_up_appended_lines_until_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("growing.jsonl");
    let text = std::fs::read_to_string(data("sensors-3k.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&input, lines[..1500].join("\n") + "\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let mut p = pipeline(&input.display().to_string(), FormatSpec::Json, &out, &dir.path().join("d"));
    let mut cfg = p.build().unwrap().config().clone();
    cfg.file_source().follow = true;
    cfg.file_source().poll_interval = Duration::from_millis(20);
    p = Pipeline::from_config(cfg);
    let job = weir_core::runtime::Job::new(
        p.build().unwrap().plan(&RunOptions { workers: Some(2), ..Default::default() }).unwrap(),
    )
    .unwrap();
    let (stop, reg) = (job.shutdown_handle(), job.registry());
    let rt = rt();
    let handle = rt.spawn(job.run());
    let read = || reg.source_records.load(std::sync::atomic::Ordering::Relaxed);
    poll(|| (read() == 1500).then_some(()));
    // Append the rest in two writes, the first ending mid-line: only its whole lines are read.
    let rest = lines[1500..].join("\n") + "\n";
    let (a, b) = rest.split_at(rest.len() / 2);
    let mut f = std::fs::OpenOptions::new().append(true).open(&input).unwrap();
    f.write_all(a.as_bytes()).unwrap();
    f.flush().unwrap();
    let whole = 1500 + a.matches('\n').count() as u64;
    poll(|| (read() == whole).then_some(()));
    f.write_all(b.as_bytes()).unwrap();
    f.flush().unwrap();
    poll(|| (read() == 3000).then_some(()));
    stop.stop();
    let summary = rt.block_on(handle).unwrap().unwrap();
    assert_eq!(summary.source_records, 3000);
    assert_same_rows(read_jsonl(&data("w2-expected.jsonl")), read_jsonl(&out), "follow");
}

#[test]
fn the_generator_is_deterministic_and_counts_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for run in 0..2 {
        let out = dir.path().join(format!("g{run}.jsonl"));
        let mut p = Pipeline::new("g");
        p.source(SourceConfig::new(
            "gen",
            SourceConnector::Generator(GeneratorSettings { count: Some(5000), devices: 10, ..Default::default() }),
        ))
        .sink(SinkConfig::new(
            "out",
            SinkConnector::File(FileSinkSettings { path: out.display().to_string(), format: FormatSpec::Json }),
        ));
        let s = rt().block_on(p.build().unwrap().run(&RunOptions { workers: Some(1), ..Default::default() })).unwrap();
        assert_eq!(s.sink_rows, 5000);
        let rows = read_jsonl(&out);
        let devices: std::collections::HashSet<_> =
            rows.iter().map(|r| r["device_id"].as_str().unwrap().to_string()).collect();
        assert_eq!(devices.len(), 10);
        outs.push(
            rows.into_iter()
                .map(|mut r| {
                    r.as_object_mut().unwrap().remove("ts");
                    r
                })
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(outs[0], outs[1], "same seed, same events (event times follow the start clock)");
}

#[test]
fn the_rated_generator_keeps_its_rate() {
    let mut p = Pipeline::new("g");
    p.source(SourceConfig::new(
        "gen",
        SourceConnector::Generator(GeneratorSettings {
            rate: Some(20_000.0),
            duration: Some(Duration::from_millis(500)),
            ..Default::default()
        }),
    ))
    .sink(SinkConfig::new(
        "out",
        SinkConnector::File(FileSinkSettings { path: "/dev/null".into(), format: FormatSpec::Json }),
    ));
    let s = rt().block_on(p.build().unwrap().run(&RunOptions { workers: Some(2), ..Default::default() })).unwrap();
    // 0.5 s at 20k/s: about 10k events (bounded, not a timing benchmark).
    assert!((8_000..=10_100).contains(&s.sink_rows), "{}", s.sink_rows);
}

#[test]
fn a_json_schema_is_inferred_from_the_first_records() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let mut p =
        pipeline(&data("sensors-3k.jsonl").display().to_string(), FormatSpec::Json, &out, &dir.path().join("d"));
    let mut cfg = p.build().unwrap().config().clone();
    cfg.source_mut().schema = None;
    p = Pipeline::from_config(cfg);
    let spec = p.build().unwrap().plan(&RunOptions { workers: Some(1), ..Default::default() }).unwrap();
    let weir_core::graph::NodeKind::Source { factory, .. } = &spec.nodes[0].kind else {
        panic!("node 0 is the source")
    };
    let schema = weir_core::SourceFactory::schema(factory.as_ref());
    let names: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["device_id", "ts", "readings"]);
    assert_eq!(schema.field(1).data_type(), &arrow_schema::DataType::Int64);
    rt().block_on(p.build().unwrap().run(&RunOptions { workers: Some(2), ..Default::default() })).unwrap();
    assert_same_rows(read_jsonl(&data("w2-expected.jsonl")), read_jsonl(&out), "inferred schema");
}
