//! What the Kafka benchmark examples share.

/// The text of the number after `"name":` in `json`: a byte search, not a JSON parser, so
/// that the clients measured around Weir cost next to nothing per record.
pub(crate) fn number<'a>(json: &'a [u8], name: &[u8]) -> Option<&'a str> {
    let at = json.windows(name.len()).position(|w| w == name)? + name.len();
    let rest = &json[at..];
    let end = rest.iter().position(|b| !(b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'e' | b'E' | b'+')))?;
    std::str::from_utf8(&rest[..end]).ok()
}
