//! The encoders' shared view of a batch's columns: typed array references and per-row scalars.

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType, UInt16Type, UInt32Type, UInt64Type,
    UInt8Type,
};
use arrow_array::{
    Array, BooleanArray, GenericListArray, LargeStringArray, PrimitiveArray, StringArray, StringViewArray, StructArray,
};
use arrow_schema::{DataType, TimeUnit};

use crate::schema::join_path;
use crate::{FormatError, Result};

/// What the encoder can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Support {
    /// Nested values too (lists): JSON, MessagePack.
    Nested,
    /// Only scalars and structs (flattened): CSV.
    Flat,
    /// Anything; unsupported types are written as their display string (dead letters).
    Lenient,
}

/// One column (or nested array) of a supported type.
#[derive(Debug)]
pub(crate) enum View<'a> {
    Null,
    Bool(&'a BooleanArray),
    I8(&'a PrimitiveArray<Int8Type>),
    I16(&'a PrimitiveArray<Int16Type>),
    I32(&'a PrimitiveArray<Int32Type>),
    I64(&'a PrimitiveArray<Int64Type>),
    U8(&'a PrimitiveArray<UInt8Type>),
    U16(&'a PrimitiveArray<UInt16Type>),
    U32(&'a PrimitiveArray<UInt32Type>),
    U64(&'a PrimitiveArray<UInt64Type>),
    F32(&'a PrimitiveArray<Float32Type>),
    F64(&'a PrimitiveArray<Float64Type>),
    Utf8(&'a StringArray),
    LargeUtf8(&'a LargeStringArray),
    StrViews(&'a StringViewArray),
    /// Written as integer milliseconds whatever the unit.
    TsS(&'a PrimitiveArray<TimestampSecondType>),
    TsMs(&'a PrimitiveArray<TimestampMillisecondType>),
    TsUs(&'a PrimitiveArray<TimestampMicrosecondType>),
    TsNs(&'a PrimitiveArray<TimestampNanosecondType>),
    Struct(&'a StructArray, Vec<Child<'a>>),
    List(&'a GenericListArray<i32>, Box<View<'a>>),
    LargeList(&'a GenericListArray<i64>, Box<View<'a>>),
    /// Any other type, rendered by Arrow's display (lenient mode only).
    Other(&'a dyn Array),
}

/// A struct member.
#[derive(Debug)]
pub(crate) struct Child<'a> {
    pub(crate) name: &'a str,
    pub(crate) view: View<'a>,
}

/// One value.
#[derive(Debug)]
pub(crate) enum Scalar<'a> {
    Null,
    Bool(bool),
    I64(i64),
    U64(u64),
    F32(f32),
    F64(f64),
    Str(&'a str),
    /// The struct's members and the row.
    Struct(&'a [Child<'a>], usize),
    /// The element view and the element range.
    List(&'a View<'a>, usize, usize),
    /// An unsupported type's array and row.
    Other(&'a dyn Array, usize),
}

/// Checks that an encoder of the given support can write `dt` (for encoder construction).
pub(crate) fn check_type(path: &str, dt: &DataType, support: Support, format: &'static str) -> Result<()> {
    let unsupported = || FormatError::UnsupportedType { field: path.to_owned(), data_type: dt.clone(), format };
    match dt {
        DataType::Null
        | DataType::Boolean
        | DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64
        | DataType::Float32
        | DataType::Float64
        | DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Utf8View
        | DataType::Timestamp(_, _) => Ok(()),
        DataType::Struct(fields) => {
            for f in fields.iter() {
                check_type(&join_path(path, f.name()), f.data_type(), support, format)?;
            }
            Ok(())
        }
        DataType::List(f) | DataType::LargeList(f) if support != Support::Flat => {
            check_type(path, f.data_type(), support, format)
        }
        _ if support == Support::Lenient => Ok(()),
        _ => Err(unsupported()),
    }
}

impl<'a> View<'a> {
    /// The view of `array`, failing on types the encoder cannot write.
    pub(crate) fn new(path: &str, array: &'a dyn Array, support: Support, format: &'static str) -> Result<View<'a>> {
        let view = match array.data_type() {
            DataType::Null => View::Null,
            DataType::Boolean => View::Bool(array.as_boolean()),
            DataType::Int8 => View::I8(array.as_primitive()),
            DataType::Int16 => View::I16(array.as_primitive()),
            DataType::Int32 => View::I32(array.as_primitive()),
            DataType::Int64 => View::I64(array.as_primitive()),
            DataType::UInt8 => View::U8(array.as_primitive()),
            DataType::UInt16 => View::U16(array.as_primitive()),
            DataType::UInt32 => View::U32(array.as_primitive()),
            DataType::UInt64 => View::U64(array.as_primitive()),
            DataType::Float32 => View::F32(array.as_primitive()),
            DataType::Float64 => View::F64(array.as_primitive()),
            DataType::Utf8 => View::Utf8(array.as_string()),
            DataType::LargeUtf8 => View::LargeUtf8(array.as_string()),
            DataType::Utf8View => View::StrViews(array.as_string_view()),
            DataType::Timestamp(TimeUnit::Second, _) => View::TsS(array.as_primitive()),
            DataType::Timestamp(TimeUnit::Millisecond, _) => View::TsMs(array.as_primitive()),
            DataType::Timestamp(TimeUnit::Microsecond, _) => View::TsUs(array.as_primitive()),
            DataType::Timestamp(TimeUnit::Nanosecond, _) => View::TsNs(array.as_primitive()),
            DataType::Struct(fields) => {
                let s = array.as_struct();
                let children = fields
                    .iter()
                    .zip(s.columns())
                    .map(|(f, c)| {
                        Ok(Child { name: f.name(), view: View::new(&join_path(path, f.name()), c, support, format)? })
                    })
                    .collect::<Result<Vec<_>>>()?;
                View::Struct(s, children)
            }
            DataType::List(_) if support != Support::Flat => {
                let l = array.as_list::<i32>();
                View::List(l, Box::new(View::new(path, l.values(), support, format)?))
            }
            DataType::LargeList(_) if support != Support::Flat => {
                let l = array.as_list::<i64>();
                View::LargeList(l, Box::new(View::new(path, l.values(), support, format)?))
            }
            _ if support == Support::Lenient => View::Other(array),
            other => {
                return Err(FormatError::UnsupportedType { field: path.to_owned(), data_type: other.clone(), format })
            }
        };
        Ok(view)
    }

    fn array(&self) -> Option<&'a dyn Array> {
        Some(match self {
            View::Null => return None,
            View::Bool(a) => *a,
            View::I8(a) => *a,
            View::I16(a) => *a,
            View::I32(a) => *a,
            View::I64(a) => *a,
            View::U8(a) => *a,
            View::U16(a) => *a,
            View::U32(a) => *a,
            View::U64(a) => *a,
            View::F32(a) => *a,
            View::F64(a) => *a,
            View::Utf8(a) => *a,
            View::LargeUtf8(a) => *a,
            View::StrViews(a) => *a,
            View::TsS(a) => *a,
            View::TsMs(a) => *a,
            View::TsUs(a) => *a,
            View::TsNs(a) => *a,
            View::Struct(a, _) => *a,
            View::List(a, _) => *a,
            View::LargeList(a, _) => *a,
            View::Other(a) => *a,
        })
    }

    /// Whether row `row` is null.
    #[inline]
    pub(crate) fn is_null(&self, row: usize) -> bool {
        match self.array() {
            Some(a) => a.is_null(row),
            None => true,
        }
    }

    /// The value at `row`.
    #[inline]
    pub(crate) fn get(&'a self, row: usize) -> Scalar<'a> {
        if self.is_null(row) {
            return Scalar::Null;
        }
        match self {
            View::Null => Scalar::Null,
            View::Bool(a) => Scalar::Bool(a.value(row)),
            View::I8(a) => Scalar::I64(a.value(row).into()),
            View::I16(a) => Scalar::I64(a.value(row).into()),
            View::I32(a) => Scalar::I64(a.value(row).into()),
            View::I64(a) => Scalar::I64(a.value(row)),
            View::U8(a) => Scalar::I64(a.value(row).into()),
            View::U16(a) => Scalar::I64(a.value(row).into()),
            View::U32(a) => Scalar::I64(a.value(row).into()),
            View::U64(a) => Scalar::U64(a.value(row)),
            View::F32(a) => Scalar::F32(a.value(row)),
            View::F64(a) => Scalar::F64(a.value(row)),
            View::Utf8(a) => Scalar::Str(a.value(row)),
            View::LargeUtf8(a) => Scalar::Str(a.value(row)),
            View::StrViews(a) => Scalar::Str(a.value(row)),
            View::TsS(a) => Scalar::I64(a.value(row).saturating_mul(1000)),
            View::TsMs(a) => Scalar::I64(a.value(row)),
            View::TsUs(a) => Scalar::I64(a.value(row).div_euclid(1000)),
            View::TsNs(a) => Scalar::I64(a.value(row).div_euclid(1_000_000)),
            View::Struct(_, children) => Scalar::Struct(children, row),
            View::List(a, values) => {
                let o = a.value_offsets();
                Scalar::List(values, o[row] as usize, o[row + 1] as usize)
            }
            View::LargeList(a, values) => {
                let o = a.value_offsets();
                Scalar::List(values, o[row] as usize, o[row + 1] as usize)
            }
            View::Other(a) => Scalar::Other(*a, row),
        }
    }
}

/// The display string of an unsupported value.
pub(crate) fn display_value(array: &dyn Array, row: usize) -> String {
    let options = arrow_cast::display::FormatOptions::default();
    match arrow_cast::display::ArrayFormatter::try_new(array, &options) {
        Ok(f) => f.value(row).to_string(),
        Err(_) => format!("<{}>", array.data_type()),
    }
}
