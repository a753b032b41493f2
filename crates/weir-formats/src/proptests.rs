//! Property tests: random valid JSON objects written by serde_json decode exactly and
//! round-trip through every format; random bytes never panic nor misalign rows.

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::SchemaRef;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

use crate::{split_records, CsvOptions, FieldSpec, FieldType, FormatSpec, SchemaSpec};

fn schema() -> SchemaRef {
    SchemaSpec::new(vec![
        FieldSpec::new("s", FieldType::String),
        FieldSpec::new("i", FieldType::Int64).with_required(false),
        FieldSpec::new("f", FieldType::Float64).with_required(false),
        FieldSpec::new("b", FieldType::Bool).with_required(false),
        FieldSpec::new_struct(
            "st",
            vec![
                FieldSpec::new("x", FieldType::Float64),
                FieldSpec::new("name", FieldType::String).with_required(false),
            ],
        )
        .with_required(false),
    ])
    .to_arrow()
}

/// One generated record: the values of the schema's fields.
#[derive(Debug, Clone)]
struct Rec {
    s: String,
    i: Option<i64>,
    f: Option<f64>,
    b: Option<bool>,
    st: Option<(f64, Option<String>)>,
    /// Whether absent optional fields are written as null (else left out).
    nulls: bool,
    /// Keys not in the schema, with any values.
    extra: Vec<(String, Value)>,
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|v| json!(v)),
        any::<u64>().prop_map(|v| json!(v)),
        finite().prop_map(|v| json!(v)),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((any::<String>(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn finite() -> impl Strategy<Value = f64> {
    prop_oneof![
        prop::num::f64::NORMAL | prop::num::f64::SUBNORMAL | prop::num::f64::ZERO,
        (-1_000_000i64..1_000_000).prop_map(|v| v as f64 / 100.0),
        any::<i32>().prop_map(f64::from),
    ]
}

fn rec() -> impl Strategy<Value = Rec> {
    let extra_key =
        "[a-z]{1,3}|\\PC{0,4}".prop_filter("not a schema key", |k| !["s", "i", "f", "b", "st"].contains(&k.as_str()));
    (
        any::<String>(),
        any::<Option<i64>>(),
        proptest::option::of(finite()),
        any::<Option<bool>>(),
        proptest::option::of((finite(), any::<Option<String>>())),
        any::<bool>(),
        prop::collection::vec((extra_key, any_json()), 0..3),
    )
        .prop_map(|(s, i, f, b, st, nulls, extra)| Rec { s, i, f, b, st, nulls, extra })
}

impl Rec {
    fn to_json(&self) -> String {
        let mut m = Map::new();
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        m.insert("s".into(), json!(self.s));
        let mut opt = |k: &str, v: Option<Value>| match v {
            Some(v) => {
                m.insert(k.into(), v);
            }
            None if self.nulls => {
                m.insert(k.into(), Value::Null);
            }
            None => {}
        };
        opt("i", self.i.map(|v| json!(v)));
        opt("f", self.f.map(|v| json!(v)));
        opt("b", self.b.map(|v| json!(v)));
        opt(
            "st",
            self.st.as_ref().map(|(x, name)| {
                let mut inner = Map::new();
                inner.insert("x".into(), json!(x));
                if let Some(n) = name {
                    inner.insert("name".into(), json!(n));
                } else if self.nulls {
                    inner.insert("name".into(), Value::Null);
                }
                inner.insert("zz".into(), json!([1, {"deep": "skip me"}]));
                Value::Object(inner)
            }),
        );
        serde_json::to_string(&Value::Object(m)).unwrap()
    }
}

/// Checks that `batch` holds exactly `recs`.
fn check(batch: &RecordBatch, recs: &[Rec]) {
    assert_eq!(batch.num_rows(), recs.len());
    let s = batch.column(0).as_string::<i32>();
    let i = batch.column(1).as_primitive::<Int64Type>();
    let f = batch.column(2).as_primitive::<Float64Type>();
    let b = batch.column(3).as_boolean();
    let st = batch.column(4).as_struct();
    let x = st.column(0).as_primitive::<Float64Type>();
    let name = st.column(1).as_string::<i32>();
    for (row, r) in recs.iter().enumerate() {
        assert_eq!(s.value(row), r.s);
        assert_eq!(i.is_valid(row).then(|| i.value(row)), r.i);
        assert_eq!(f.is_valid(row).then(|| f.value(row).to_bits()), r.f.map(f64::to_bits));
        assert_eq!(b.is_valid(row).then(|| b.value(row)), r.b);
        match &r.st {
            None => assert!(st.is_null(row)),
            Some((xv, n)) => {
                assert!(st.is_valid(row));
                assert_eq!(x.value(row).to_bits(), xv.to_bits());
                assert_eq!(name.is_valid(row).then(|| name.value(row)), n.as_deref());
            }
        }
    }
}

fn decode(format: &FormatSpec, schema: &SchemaRef, buf: &[u8], header: Option<&[String]>) -> crate::Decoded {
    let mut ranges = Vec::new();
    let used = split_records(format, buf, true, &mut ranges).unwrap();
    assert_eq!(used, buf.len());
    let d = format.decoder_with_header(schema.clone(), header).unwrap().decode(buf, &ranges).unwrap();
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    d
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn serde_json_objects_decode_exactly_and_round_trip(recs in prop::collection::vec(rec(), 1..20)) {
        let schema = schema();
        let text: String = recs.iter().map(|r| r.to_json() + "\n").collect();
        let d = decode(&FormatSpec::Json, &schema, text.as_bytes(), None);
        check(&d.batch, &recs);

        // JSON: encode, check serde_json reads it, decode again.
        let mut out = Vec::new();
        FormatSpec::Json.encoder(schema.clone()).unwrap().encode(&d.batch, &mut out).unwrap();
        for line in std::str::from_utf8(&out).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            prop_assert_eq!(v.as_object().map(|o| o.len()), Some(5));
        }
        check(&decode(&FormatSpec::Json, &schema, &out, None).batch, &recs);

        // MessagePack.
        let mut out = Vec::new();
        FormatSpec::MsgPack.encoder(schema.clone()).unwrap().encode(&d.batch, &mut out).unwrap();
        check(&decode(&FormatSpec::MsgPack, &schema, &out, None).batch, &recs);

        // CSV holds no line breaks inside fields: check the records without them.
        let flat: Vec<Rec> = recs
            .iter()
            .filter(|r| {
                let bad = |s: &str| s.contains(['\n', '\r']);
                !bad(&r.s) && !r.st.as_ref().is_some_and(|(_, n)| n.as_deref().is_some_and(bad))
            })
            .cloned()
            .collect();
        if !flat.is_empty() {
            let text: String = flat.iter().map(|r| r.to_json() + "\n").collect();
            let d = decode(&FormatSpec::Json, &schema, text.as_bytes(), None);
            let format = FormatSpec::Csv(CsvOptions::default());
            let mut out = Vec::new();
            format.encoder(schema.clone()).unwrap().encode(&d.batch, &mut out).unwrap();
            let header_end = out.iter().position(|&b| b == b'\n').unwrap();
            let header = crate::csv_header(&out[..header_end], b',');
            check(&decode(&format, &schema, &out[header_end + 1..], Some(&header)).batch, &flat);
        }
    }

    #[test]
    fn any_bytes_give_a_row_or_an_error(
        lines in prop::collection::vec(
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..40),
                (rec(), any::<prop::sample::Index>()).prop_map(|(r, cut)| {
                    let j = r.to_json().into_bytes();
                    let n = cut.index(j.len() + 1);
                    j[..n].to_vec()
                }),
            ],
            1..20,
        )
    ) {
        let schema = schema();
        for format in [FormatSpec::Json, FormatSpec::Csv(CsvOptions::default()), FormatSpec::MsgPack] {
            let mut buf = Vec::new();
            let mut ranges = Vec::new();
            for l in &lines {
                let start = buf.len();
                buf.extend_from_slice(l);
                ranges.push(start..buf.len());
            }
            let d = format.decoder(schema.clone()).unwrap().decode(&buf, &ranges).unwrap();
            prop_assert_eq!(d.batch.num_rows() + d.errors.len(), lines.len());
            for c in d.batch.columns() {
                c.to_data().validate_full().unwrap();
            }
            let mut all: Vec<usize> = d.errors.iter().map(|e| e.index).collect();
            all.extend((0..d.batch.num_rows()).map(|r| d.record_of_row(r)));
            all.sort_unstable();
            prop_assert_eq!(all, (0..lines.len()).collect::<Vec<_>>());
        }
    }
}
