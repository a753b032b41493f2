#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, Int64Type};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray, StructArray,
};
use arrow_buffer::NullBuffer;
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef};

use super::*;

fn readings_fields() -> Fields {
    Fields::from(vec![
        Field::new("temp", DataType::Float64, true),
        Field::new("hum", DataType::Float64, true),
        Field::new("temp (C)", DataType::Int32, true),
    ])
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("ts", DataType::Int64, false),
        Field::new("readings", DataType::Struct(readings_fields()), true),
        Field::new("status", DataType::Utf8, true),
        Field::new("odd col", DataType::Int32, true),
        Field::new("ok", DataType::Boolean, true),
    ]))
}

/// Five rows. Row 2 has a NULL `readings` struct whose child still holds
/// 99.0 (allowed by Arrow); row 3 has a NULL temp.
fn batch() -> RecordBatch {
    let readings = StructArray::new(
        readings_fields(),
        vec![
            Arc::new(Float64Array::from(vec![Some(20.0), Some(30.0), Some(99.0), None, Some(25.5)])),
            Arc::new(Float64Array::from(vec![0.5, 0.6, 0.7, 0.8, 0.9])),
            Arc::new(Int32Array::from(vec![1, 2, 3, 4, 5])),
        ],
        Some(NullBuffer::from(vec![true, true, false, true, true])),
    );
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(StringArray::from(vec!["a", "b", "c", "d", "e"])),
            Arc::new(Int64Array::from(vec![10, 20, 30, 40, 50])),
            Arc::new(readings),
            Arc::new(StringArray::from(vec![Some("on"), None, Some("off"), Some("on"), None])),
            Arc::new(Int32Array::from(vec![Some(1), None, Some(3), Some(4), Some(5)])),
            Arc::new(BooleanArray::from(vec![Some(true), None, Some(false), Some(true), Some(true)])),
        ],
    )
    .unwrap()
}

fn mask(sql: &str) -> Vec<bool> {
    let p = Predicate::compile(sql, &schema()).unwrap();
    let m = p.evaluate(&batch()).unwrap();
    assert_eq!(m.null_count(), 0, "{sql}");
    assert!(m.nulls().is_none(), "{sql}");
    m.values().iter().collect()
}

fn eval(sql: &str) -> ArrayRef {
    let e = CompiledExpr::compile(sql, &schema()).unwrap();
    let a = e.evaluate(&batch()).unwrap();
    assert_eq!(a.len(), 5, "{sql}");
    assert_eq!(a.data_type(), e.data_type(), "{sql}");
    a
}

fn strings(a: &ArrayRef) -> Vec<Option<String>> {
    let a = arrow_cast_to_utf8(a);
    a.as_string::<i32>().iter().map(|s| s.map(str::to_string)).collect()
}

fn arrow_cast_to_utf8(a: &ArrayRef) -> ArrayRef {
    match a.data_type() {
        DataType::Utf8 => Arc::clone(a),
        DataType::Utf8View => {
            let v = a.as_string_view();
            Arc::new(StringArray::from_iter(v.iter()))
        }
        DataType::LargeUtf8 => {
            let v = a.as_string::<i64>();
            Arc::new(StringArray::from_iter(v.iter()))
        }
        other => panic!("not a string: {other}"),
    }
}

fn f64s(a: &ArrayRef) -> Vec<Option<f64>> {
    a.as_primitive::<Float64Type>().iter().collect()
}

#[test]
fn filter_nested_field_with_nulls() {
    // Row 2: NULL struct (child holds 99.0) -> false; row 3: NULL temp -> false.
    assert_eq!(mask("readings.temp > 25.0"), [false, true, false, false, true]);
    assert_eq!(mask("readings.temp IS NULL"), [false, false, true, true, false]);
    assert_eq!(mask("readings IS NULL"), [false, false, true, false, false]);
    assert_eq!(mask("NOT (readings.temp > 25.0)"), [true, false, false, false, false]);
    assert_eq!(mask("readings.temp > 25 OR status = 'on'"), [true, true, false, true, true]);
    assert_eq!(mask("ok"), [true, false, false, true, true]);
    assert_eq!(mask("ok AND ts >= 20"), [false, false, false, true, true]);
}

#[test]
fn plain_column_paths_take_the_column() {
    let s = schema();
    let e = CompiledExpr::compile("readings.temp", &s).unwrap();
    assert!(e.is_column_path());
    assert_eq!(e.data_type(), &DataType::Float64);
    assert!(e.nullable());
    let a = e.evaluate(&batch()).unwrap();
    // The NULL struct row reads as NULL even though the child holds 99.0.
    assert_eq!(f64s(&a), [Some(20.0), Some(30.0), None, None, Some(25.5)]);

    let e = CompiledExpr::compile("device_id", &s).unwrap();
    assert!(e.is_column_path());
    assert!(!e.nullable());
    let b = batch();
    let a = e.evaluate(&b).unwrap();
    // No copy: the very same array.
    assert!(Arc::ptr_eq(&a, b.column(0)));

    let p = Projection::compile("readings.temp", &s).unwrap();
    assert_eq!(p.name, "temp");
    let p = Projection::compile("readings.\"temp (C)\"", &s).unwrap();
    assert_eq!(p.name, "temp (C)");
    assert_eq!(p.expr.data_type(), &DataType::Int32);
    let p = Projection::compile("\"odd col\"", &s).unwrap();
    assert_eq!(p.name, "odd col");
    assert!(p.expr.is_column_path());
    assert!(!CompiledExpr::compile("ts + 1", &s).unwrap().is_column_path());
}

#[test]
fn arithmetic_with_alias() {
    let s = schema();
    let p = Projection::compile("readings.temp * 1.8 + 32 AS temp_f", &s).unwrap();
    assert_eq!(p.name, "temp_f");
    assert_eq!(p.expr.sql(), "readings.temp * 1.8 + 32");
    assert_eq!(p.expr.data_type(), &DataType::Float64);
    let a = p.expr.evaluate(&batch()).unwrap();
    assert_eq!(f64s(&a), [Some(68.0), Some(86.0), None, None, Some(77.9)]);

    // Integer arithmetic stays integer; implicit alias; no alias -> text.
    let p = Projection::compile("ts * 2 + \"odd col\" doubled", &s).unwrap();
    assert_eq!(p.name, "doubled");
    let a = p.expr.evaluate(&batch()).unwrap();
    assert_eq!(
        a.as_primitive::<Int64Type>().iter().collect::<Vec<_>>(),
        [Some(21), None, Some(63), Some(84), Some(105)]
    );
    let p = Projection::compile("concat('é€', device_id)\n   AS x", &s).unwrap();
    assert_eq!((p.name.as_str(), p.expr.sql()), ("x", "concat('é€', device_id)"));
    let p = Projection::compile("  ts % 3  ", &s).unwrap();
    assert_eq!(p.name, "ts % 3");
    let p = Projection::compile("readings.hum / 2 as half", &s).unwrap();
    assert_eq!(p.name, "half");
    assert_eq!(f64s(&p.expr.evaluate(&batch()).unwrap()), [Some(0.25), Some(0.3), None, Some(0.4), Some(0.45)]);
}

#[test]
fn casts() {
    let a = eval("CAST(ts AS VARCHAR)");
    assert_eq!(a.data_type(), &DataType::Utf8);
    assert_eq!(strings(&a)[0].as_deref(), Some("10"));
    let a = eval("CAST(readings.temp AS BIGINT)");
    assert_eq!(a.as_primitive::<Int64Type>().iter().collect::<Vec<_>>(), [Some(20), Some(30), None, None, Some(25)]);
    let a = eval("CAST('12' AS INT) + \"odd col\"");
    assert_eq!(a.data_type(), &DataType::Int32);
    assert_eq!(a.as_primitive::<Int32Type>().value(0), 13);
    let a = eval("ts::DOUBLE / 4");
    assert_eq!(f64s(&a)[0], Some(2.5));
    // A cast that fails at run time is an evaluation error.
    let e = CompiledExpr::compile("CAST(device_id AS INT)", &schema()).unwrap();
    let err = e.evaluate(&batch()).unwrap_err();
    assert!(matches!(err, ExprError::Eval { .. }), "{err}");
    let a = eval("TRY_CAST(device_id AS INT)");
    assert_eq!(a.null_count(), 5);
}

#[test]
fn case_when() {
    let a = eval(
        "CASE WHEN readings.temp > 25 THEN 'hot' \
              WHEN readings.temp IS NULL THEN 'unknown' \
              ELSE 'ok' END",
    );
    assert_eq!(strings(&a), ["ok", "hot", "unknown", "unknown", "hot"].map(|s| Some(s.to_string())));
    let a = eval("CASE status WHEN 'on' THEN 1 WHEN 'off' THEN 0 END");
    assert_eq!(a.as_primitive::<Int64Type>().iter().collect::<Vec<_>>(), [Some(1), None, Some(0), Some(1), None]);
}

#[test]
fn string_functions() {
    let some = |v: [&str; 5]| v.map(|s| Some(s.to_string())).to_vec();
    assert_eq!(strings(&eval("upper(device_id)")), some(["A", "B", "C", "D", "E"]));
    assert_eq!(strings(&eval("LOWER(UPPER(device_id))")), some(["a", "b", "c", "d", "e"]));
    assert_eq!(strings(&eval("concat(device_id, '-', status)")), some(["a-on", "b-", "c-off", "d-on", "e-"]));
    assert_eq!(
        strings(&eval("device_id || ':' || coalesce(status, 'none')")),
        some(["a:on", "b:none", "c:off", "d:on", "e:none"])
    );
    assert_eq!(strings(&eval("nullif(status, 'on')")), [None, None, Some("off".to_string()), None, None]);
    let a = eval("length(coalesce(status, ''))");
    assert_eq!(a.as_primitive::<Int32Type>().iter().collect::<Vec<_>>(), [Some(2), Some(0), Some(3), Some(2), Some(0)]);
    assert_eq!(strings(&eval("substr('hello', 2, 3)"))[0].as_deref(), Some("ell"));
    assert_eq!(strings(&eval("replace(trim('  a b  '), ' ', '_')"))[0].as_deref(), Some("a_b"));
    assert_eq!(mask("device_id LIKE 'a%' OR status ILIKE 'OF%'"), [true, false, true, false, false]);
    assert_eq!(mask("starts_with(device_id, 'd')"), [false, false, false, true, false]);
    assert_eq!(mask("regexp_like(device_id, '^[b-d]$')"), [false, true, true, true, false]);
    assert_eq!(mask("device_id ~ '^[b-d]$'"), [false, true, true, true, false]);
    assert_eq!(mask("device_id SIMILAR TO '(a|e)'"), [true, false, false, false, true]);
}

#[test]
fn math_functions() {
    let a = eval("abs(readings.temp - 25)");
    assert_eq!(f64s(&a), [Some(5.0), Some(5.0), None, None, Some(0.5)]);
    let a = eval("round(readings.hum * 10 / 3, 1)");
    assert_eq!(f64s(&a)[0], Some(1.7));
    let a = eval("sqrt(ts)");
    assert!((f64s(&a)[0].unwrap() - 10f64.sqrt()).abs() < 1e-12);
    let a = eval("greatest(ts, 35)");
    assert_eq!(a.as_primitive::<Int64Type>().value(0), 35);
    let a = eval("power(2.0, 10)");
    assert_eq!(f64s(&a)[4], Some(1024.0));
    let a = eval("floor(readings.temp / 10) * 10");
    assert_eq!(f64s(&a), [Some(20.0), Some(30.0), None, None, Some(20.0)]);
}

#[test]
fn predicates_in_between_null_logic() {
    assert_eq!(mask("device_id IN ('a', 'c', 'x')"), [true, false, true, false, false]);
    assert_eq!(mask("device_id NOT IN ('a', 'c')"), [false, true, false, true, true]);
    // NOT IN with NULL in the list is NULL -> false everywhere.
    assert_eq!(mask("ts NOT IN (10, NULL)"), [false; 5]);
    assert_eq!(mask("ts BETWEEN 20 AND 40"), [false, true, true, true, false]);
    assert_eq!(mask("readings.temp NOT BETWEEN 21 AND 26"), [true, true, false, false, false]);
    assert_eq!(mask("status IS NOT NULL AND ts > 15"), [false, false, true, true, false]);
    assert_eq!(mask("status IS DISTINCT FROM 'on'"), [false, true, true, false, true]);
    assert_eq!(mask("\"odd col\" = 3 OR \"odd col\" IS NULL"), [false, true, true, false, false]);
    assert_eq!(mask("`odd col` <> 3"), [true, false, false, true, true]);
    assert_eq!(mask("readings['hum'] >= 0.8"), [false, false, false, true, true]);
    assert_eq!(mask("true"), [true; 5]);
    assert_eq!(mask("1 = 2"), [false; 5]);
    assert_eq!(mask("NULL::BOOLEAN"), [false; 5]);
}

#[test]
fn scalars_broadcast() {
    let a = eval("1 + 1");
    assert_eq!(a.as_primitive::<Int64Type>().iter().collect::<Vec<_>>(), [Some(2); 5]);
    let a = eval("'x'");
    assert_eq!(strings(&a), vec![Some("x".to_string()); 5]);
}

#[test]
fn parse_error() {
    let err = CompiledExpr::compile("readings.temp >", &schema()).unwrap_err();
    assert!(matches!(err, ExprError::Parse { .. }), "{err}");
    assert!(err.to_string().contains("readings.temp >"), "{err}");
    let err = Predicate::compile("ts > 1 2", &schema()).unwrap_err();
    assert!(matches!(err, ExprError::Parse { .. }), "{err}");
    let err = Projection::compile("ts AS", &schema()).unwrap_err();
    assert!(matches!(err, ExprError::Parse { .. }), "{err}");
    let err = CompiledExpr::compile("", &schema()).unwrap_err();
    assert!(matches!(err, ExprError::Parse { .. }), "{err}");
}

#[test]
fn unknown_column_lists_alternatives() {
    let err = Predicate::compile("readings.tmp > 25.0", &schema()).unwrap_err();
    let ExprError::Plan { expr, message } = &err else { panic!("{err}") };
    assert_eq!(expr, "readings.tmp > 25.0");
    assert_eq!(
        message,
        "unknown column `readings.tmp`; available: device_id, ts, readings.temp, \
         readings.hum, readings.\"temp (C)\", status, \"odd col\", ok"
    );
    // Inside function arguments and CASE too; columns are case-sensitive.
    for sql in ["upper(Device_Id) = 'A'", "CASE WHEN nope THEN 1 END", "ts.x = 1", "\"readings.temp\" > 1"] {
        let err = CompiledExpr::compile(sql, &schema()).unwrap_err();
        assert!(err.to_string().contains("unknown column"), "{sql}: {err}");
        assert!(err.to_string().contains("available: device_id"), "{sql}: {err}");
    }
}

#[test]
fn other_plan_errors() {
    let err = CompiledExpr::compile("no_such_fn(ts)", &schema()).unwrap_err();
    assert!(matches!(err, ExprError::Plan { .. }), "{err}");
    let err = CompiledExpr::compile("sum(ts)", &schema()).unwrap_err();
    assert!(matches!(err, ExprError::Plan { .. }), "{err}");
    for sql in ["now()", "ts > CURRENT_TIMESTAMP", "CURRENT_DATE"] {
        let err = CompiledExpr::compile(sql, &schema()).unwrap_err();
        assert!(matches!(err, ExprError::Plan { .. }), "{err}");
        assert!(err.to_string().contains("not available"), "{err}");
    }
    // DataFusion's own planning errors come through without its prefixes.
    let err = CompiledExpr::compile("uper(device_id)", &schema()).unwrap_err();
    assert_eq!(err.to_string(), "invalid expression `uper(device_id)`: Invalid function 'uper'. Did you mean 'upper'?");
    let err = CompiledExpr::compile("device_id + readings", &schema()).unwrap_err();
    assert!(matches!(err, ExprError::Plan { .. }), "{err}");
}

#[test]
fn non_boolean_predicate() {
    let err = Predicate::compile("readings.temp * 2", &schema()).unwrap_err();
    let ExprError::NotBoolean { expr, actual } = &err else { panic!("{err}") };
    assert_eq!(expr, "readings.temp * 2");
    assert_eq!(actual, &DataType::Float64);
    assert_eq!(err.to_string(), "filter `readings.temp * 2` must be a boolean expression, but it has type Float64");
    assert!(Predicate::compile("device_id", &schema()).is_err());
}

#[test]
fn star_expansion() {
    let s = schema();
    let items = ["*".to_string(), "readings.temp * 1.8 + 32 AS temp_f".to_string()];
    let (projs, out) = compile_projections(&items, &s).unwrap();
    assert_eq!(projs.len(), 7);
    let names: Vec<&str> = out.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["device_id", "ts", "readings", "status", "odd col", "ok", "temp_f"]);
    for (i, f) in s.fields().iter().enumerate() {
        assert_eq!(out.field(i), f.as_ref());
    }
    let b = batch();
    let res = project(&b, &projs, &out).unwrap();
    assert_eq!(res.num_rows(), 5);
    assert!(Arc::ptr_eq(res.column(0), b.column(0)));
    assert_eq!(f64s(res.column(6))[1], Some(86.0));

    let items = ["device_id".to_string(), "readings.temp".to_string(), "upper(status)".to_string()];
    let (projs, out) = compile_projections(&items, &s).unwrap();
    let names: Vec<&str> = out.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["device_id", "temp", "upper(status)"]);
    assert!(!out.field(0).is_nullable());
    assert!(out.field(1).is_nullable());
    let res = project(&b, &projs, &out).unwrap();
    assert_eq!(res.num_columns(), 3);
    assert_eq!(f64s(res.column(1))[2], None);

    // No items: an empty batch that keeps the row count.
    let (projs, out) = compile_projections(&[], &s).unwrap();
    assert_eq!(project(&b, &projs, &out).unwrap().num_rows(), 5);

    let err = Projection::compile("*", &s).unwrap_err();
    assert!(matches!(err, ExprError::Plan { .. }), "{err}");
}

#[test]
fn duplicate_names() {
    let s = schema();
    let items = ["*".to_string(), "ts + 1 AS device_id".to_string()];
    let err = compile_projections(&items, &s).unwrap_err();
    let ExprError::DuplicateName { name, first, second } = &err else { panic!("{err}") };
    assert_eq!((name.as_str(), first.as_str()), ("device_id", "*"));
    assert_eq!(second, "ts + 1 AS device_id");
    assert_eq!(err.to_string(), "duplicate output column `device_id`: produced by both `*` and `ts + 1 AS device_id`");
    let items = ["readings.temp".to_string(), "ts AS temp".to_string()];
    let err = compile_projections(&items, &s).unwrap_err();
    assert!(err.to_string().contains("`readings.temp` and `ts AS temp`"), "{err}");
}

#[test]
fn schema_mismatch_is_an_error() {
    let e = CompiledExpr::compile("ts + 1", &schema()).unwrap();
    let other = Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("ts", DataType::Utf8, false),
    ]));
    let b = RecordBatch::try_new(
        other,
        vec![Arc::new(StringArray::from(vec!["a"])), Arc::new(StringArray::from(vec!["1"]))],
    )
    .unwrap();
    let err = e.evaluate(&b).unwrap_err();
    assert!(matches!(err, ExprError::Eval { .. }), "{err}");
    // An equal schema in another Arc is fine.
    let same = Arc::new(schema().as_ref().clone());
    let b = batch().with_schema(same).unwrap();
    assert_eq!(e.evaluate(&b).unwrap().len(), 5);
}

#[test]
fn nested_structs_and_sliced_batches() {
    let inner = Fields::from(vec![Field::new("v", DataType::Int64, true)]);
    let outer = Fields::from(vec![Field::new("inner", DataType::Struct(inner.clone()), true)]);
    let s = Arc::new(Schema::new(vec![Field::new("o", DataType::Struct(outer.clone()), true)]));
    let inner_arr = StructArray::new(
        inner,
        vec![Arc::new(Int64Array::from(vec![1, 2, 3, 4]))],
        Some(NullBuffer::from(vec![true, false, true, true])),
    );
    let outer_arr =
        StructArray::new(outer, vec![Arc::new(inner_arr)], Some(NullBuffer::from(vec![true, true, false, true])));
    let b = RecordBatch::try_new(Arc::clone(&s), vec![Arc::new(outer_arr)]).unwrap();
    let p = Predicate::compile("o.inner.v > 0", &s).unwrap();
    assert_eq!(p.evaluate(&b).unwrap().values().iter().collect::<Vec<_>>(), [true, false, false, true]);
    let e = CompiledExpr::compile("o.inner.v", &s).unwrap();
    assert!(e.is_column_path());
    let a = e.evaluate(&b).unwrap();
    assert_eq!(a.as_primitive::<Int64Type>().iter().collect::<Vec<_>>(), [Some(1), None, None, Some(4)]);
    let e = CompiledExpr::compile("o.inner.v * 10", &s).unwrap();
    let sliced = b.slice(1, 3);
    let a = e.evaluate(&sliced).unwrap();
    assert_eq!(a.as_primitive::<Int64Type>().iter().collect::<Vec<_>>(), [None, None, Some(40)]);
    assert_eq!(p.evaluate(&sliced).unwrap().values().iter().collect::<Vec<_>>(), [false, false, true]);
}

#[test]
fn function_list_and_paths() {
    let f = available_functions();
    for name in ["abs", "coalesce", "concat", "get_field", "lower", "round", "sqrt", "upper"] {
        assert!(f.iter().any(|n| n == name), "{name}");
    }
    assert!(!f.iter().any(|n| n == "now"));
    assert_eq!(column_paths(&schema()).len(), 8);
}

#[test]
fn timestamps_maps_lists_dictionaries() {
    use arrow_array::builder::{Int64Builder, ListBuilder, MapBuilder, StringBuilder};
    use arrow_array::types::TimestampMillisecondType;
    use arrow_array::{DictionaryArray, TimestampMillisecondArray};
    use arrow_schema::TimeUnit;

    let mut mb = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    mb.keys().append_value("color");
    mb.values().append_value("red");
    mb.append(true).unwrap();
    mb.append(true).unwrap();
    let map = mb.finish();
    let mut lb = ListBuilder::new(Int64Builder::new());
    lb.values().append_value(7);
    lb.values().append_value(8);
    lb.append(true);
    lb.append(false);
    let list = lb.finish();
    let dict: DictionaryArray<Int32Type> = vec!["p", "q"].into_iter().collect();
    let s = Arc::new(Schema::new(vec![
        Field::new("t", DataType::Timestamp(TimeUnit::Millisecond, None), true),
        Field::new("attrs", map.data_type().clone(), true),
        Field::new("xs", list.data_type().clone(), true),
        Field::new("d", dict.data_type().clone(), true),
    ]));
    let b = RecordBatch::try_new(
        Arc::clone(&s),
        vec![
            // 2023-11-14T22:13:20 and 22:23:20
            Arc::new(TimestampMillisecondArray::from(vec![1_700_000_000_000, 1_700_000_600_000])),
            Arc::new(map),
            Arc::new(list),
            Arc::new(dict),
        ],
    )
    .unwrap();
    let eval = |sql: &str| {
        let e = CompiledExpr::compile(sql, &s).unwrap();
        let a = e.evaluate(&b).unwrap();
        assert_eq!(a.data_type(), e.data_type(), "{sql}");
        a
    };
    let ts = |a: ArrayRef| a.as_primitive::<TimestampMillisecondType>().iter().collect::<Vec<_>>();
    let m = |sql: &str| {
        let p = Predicate::compile(sql, &s).unwrap();
        p.evaluate(&b).unwrap().values().iter().collect::<Vec<_>>()
    };
    assert_eq!(ts(eval("date_trunc('hour', t)")), [Some(1_699_999_200_000); 2]);
    assert_eq!(ts(eval("t + INTERVAL '5 minutes'")), [Some(1_700_000_300_000), Some(1_700_000_900_000)]);
    assert_eq!(m("t >= TIMESTAMP '2023-11-14 22:20:00'"), [false, true]);
    assert_eq!(m("extract(minute FROM t) = 13"), [true, false]);
    assert_eq!(strings(&eval("attrs['color']")), [Some("red".into()), None]);
    assert_eq!(strings(&eval("attrs.color")), [Some("red".into()), None]);
    assert_eq!(eval("xs[2]").as_primitive::<Int64Type>().iter().collect::<Vec<_>>(), [Some(8), None]);
    assert_eq!(m("d = 'q'"), [false, true]);
}

/// A struct column named like a SQL word (`user`) is reached by quoting its name; unquoted,
/// the error says so instead of DataFusion's "dot access not supported".
#[test]
fn a_column_named_like_a_sql_word_is_quoted() {
    let schema = Arc::new(Schema::new(vec![Field::new(
        "user",
        DataType::Struct(vec![Field::new("country", DataType::Utf8, true)].into()),
        true,
    )]));
    assert!(CompiledExpr::compile("\"user\".country", &schema).is_ok());
    let err = CompiledExpr::compile("user.country", &schema).unwrap_err().to_string();
    assert!(err.contains("`user` is a SQL word") && err.contains("\"user\".country"), "{err}");
}
