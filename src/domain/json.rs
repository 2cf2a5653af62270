//! JSON helpers for domain fields.

/// Deserializes an integer that JSON may write as `153` or `153.0` (JSON Schema
/// counts both as integers); anything fractional or out of range is refused.
pub fn integral<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64>,
{
    use serde::Deserialize;
    let n = serde_json::Number::deserialize(d)?;
    let v = match (n.as_i64(), n.as_f64()) {
        (Some(i), _) => Some(i),
        (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(f as i64),
        _ => None,
    };
    v.and_then(|i| T::try_from(i).ok())
        .ok_or_else(|| serde::de::Error::custom("expected an integer"))
}
