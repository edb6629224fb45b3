//! A compact binary encoding of `serde_json::Value` for event payloads.
//!
//! postcard cannot carry a `Value` (it needs a self-describing format). This encoding is a
//! tagged tree with LEB128 varints, decoded straight into `Value`s with no tokenising, escape
//! handling or number parsing. It is smaller than JSON text, and number kinds are kept exactly
//! (`u64`, negative `i64`, `f64`), so values compare equal after a round trip.
//!
//! ```text
//! 0 null | 1 false | 2 true | 3 u64 (varint) | 4 i64 (zigzag varint) | 5 f64 (8 bytes LE)
//! 6 string (varint len, UTF-8) | 7 array (varint count, items) | 8 object (varint count, (string, value)*)
//! ```

use serde_json::{Map, Number, Value};

/// Deepest nesting accepted: 128, what `Event::validate` allowed until it became
/// `MAX_DATA_DEPTH` (100), so that files written then still read; at least what every
/// received event keeps (`MAX_RECEIVED_DATA_DEPTH`), so that what a reader takes in always
/// encodes.
pub(crate) const MAX_DEPTH: usize = 128;
const _: () = assert!(MAX_DEPTH >= ksync_core::MAX_RECEIVED_DATA_DEPTH);

const NULL: u8 = 0;
const FALSE: u8 = 1;
const TRUE: u8 = 2;
const U64: u8 = 3;
const I64: u8 = 4;
const F64: u8 = 5;
const STRING: u8 = 6;
const ARRAY: u8 = 7;
const OBJECT: u8 = 8;

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Appends the encoding of `value`; fails only for nesting deeper than [`MAX_DEPTH`].
pub(crate) fn encode(value: &Value, out: &mut Vec<u8>) -> Result<(), String> {
    encode_at(value, out, 0)
}

fn encode_at(value: &Value, out: &mut Vec<u8>, depth: usize) -> Result<(), String> {
    match value {
        Value::Null => out.push(NULL),
        Value::Bool(false) => out.push(FALSE),
        Value::Bool(true) => out.push(TRUE),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                out.push(U64);
                put_varint(out, u);
            } else if let Some(i) = n.as_i64() {
                out.push(I64);
                put_varint(out, ((i << 1) ^ (i >> 63)) as u64);
            } else if let Some(f) = n.as_f64() {
                out.push(F64);
                out.extend_from_slice(&f.to_le_bytes());
            } else {
                return Err(format!("number {n} has no u64, i64 or f64 form"));
            }
        }
        Value::String(s) => {
            out.push(STRING);
            put_str(out, s);
        }
        Value::Array(items) => {
            if depth >= MAX_DEPTH {
                return Err(format!("data nests deeper than {MAX_DEPTH} levels"));
            }
            out.push(ARRAY);
            put_varint(out, items.len() as u64);
            for item in items {
                encode_at(item, out, depth + 1)?;
            }
        }
        Value::Object(map) => {
            if depth >= MAX_DEPTH {
                return Err(format!("data nests deeper than {MAX_DEPTH} levels"));
            }
            out.push(OBJECT);
            put_varint(out, map.len() as u64);
            for (key, item) in map {
                put_str(out, key);
                encode_at(item, out, depth + 1)?;
            }
        }
    }
    Ok(())
}

/// Decodes one value that must fill `bytes` exactly.
pub(crate) fn decode(bytes: &[u8]) -> Result<Value, String> {
    let mut reader = Reader::new(bytes);
    let value = reader.value(0)?;
    if reader.pos != bytes.len() {
        return Err("trailing bytes after the event data".into());
    }
    Ok(value)
}

/// Checks that `bytes` is one value that [`decode`] accepts, without building it: the same
/// rules (tags, varints, lengths, counts, UTF-8, depth, finite floats, no trailing bytes).
pub(crate) fn check(bytes: &[u8]) -> Result<(), String> {
    let mut reader = Reader::new(bytes);
    reader.skip_value(0)?;
    if reader.pos != bytes.len() {
        return Err("trailing bytes after the event data".into());
    }
    Ok(())
}

/// Whether `raw` is UTF-8. ASCII (the common case) is checked a word at a time first:
/// `str::from_utf8` goes byte by byte over short, unaligned strings like ours.
pub(crate) fn is_utf8(raw: &[u8]) -> bool {
    raw.is_ascii() || std::str::from_utf8(raw).is_ok()
}

/// An owned, checked copy of a string's bytes. Copied first, then checked in place: the copy
/// is aligned, so `from_utf8` takes its word-at-a-time path, which is several times faster
/// than on the unaligned original.
pub(crate) fn owned_str(raw: &[u8]) -> Result<String, String> {
    String::from_utf8(raw.to_vec()).map_err(|_| "string is not UTF-8".to_string())
}

/// Refuses a container at `depth` when it would nest deeper than [`MAX_DEPTH`].
fn nest(depth: usize) -> Result<(), String> {
    if depth >= MAX_DEPTH {
        Err("event data nests too deep".into())
    } else {
        Ok(())
    }
}

/// A cursor over encoded bytes (event data, and the fixed fields of an event record).
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    /// What has not been read yet.
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.bytes.get(self.pos..).unwrap_or_default()
    }

    /// A length-prefixed byte string, not checked for UTF-8.
    pub(crate) fn str_bytes(&mut self) -> Result<&'a [u8], String> {
        let len = self.varint()?;
        self.take(len)
    }

    /// A length-prefixed string, checked and copied.
    pub(crate) fn string(&mut self) -> Result<String, String> {
        owned_str(self.str_bytes()?)
    }

    /// A length-prefixed string that must be UTF-8, skipped.
    fn skip_str(&mut self) -> Result<(), String> {
        if is_utf8(self.str_bytes()?) {
            Ok(())
        } else {
            Err("string in event data is not UTF-8".into())
        }
    }

    fn byte(&mut self) -> Result<u8, String> {
        let b = *self
            .bytes
            .get(self.pos)
            .ok_or_else(|| "event data ends early".to_string())?;
        self.pos += 1;
        Ok(b)
    }

    pub(crate) fn varint(&mut self) -> Result<u64, String> {
        // Most varints (lengths, counts, small numbers) are one byte.
        if let Some(&b) = self.bytes.get(self.pos)
            && b < 0x80
        {
            self.pos += 1;
            return Ok(u64::from(b));
        }
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err("varint overflows u64".into());
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint is too long".into())
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8], String> {
        let len = usize::try_from(len).map_err(|_| "length out of range".to_string())?;
        let end = self
            .pos
            .checked_add(len)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| "event data ends early".to_string())?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    /// A count of items that each take at least one byte: bounded by what is left, so a
    /// damaged count cannot make us reserve gigabytes.
    fn count(&mut self) -> Result<usize, String> {
        let n = self.varint()?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err("item count exceeds the record".into());
        }
        usize::try_from(n).map_err(|_| "item count out of range".to_string())
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        Ok(match self.byte()? {
            NULL => Value::Null,
            FALSE => Value::Bool(false),
            TRUE => Value::Bool(true),
            U64 => Value::Number(Number::from(self.varint()?)),
            I64 => {
                let z = self.varint()?;
                let i = ((z >> 1) as i64) ^ -((z & 1) as i64);
                Value::Number(Number::from(i))
            }
            F64 => Value::Number(
                Number::from_f64(self.finite_f64()?)
                    .ok_or_else(|| "non-finite number".to_string())?,
            ),
            STRING => Value::String(self.string()?),
            ARRAY => {
                nest(depth)?;
                let n = self.count()?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(depth + 1)?);
                }
                Value::Array(items)
            }
            OBJECT => {
                nest(depth)?;
                let n = self.count()?;
                let mut map = Map::new();
                for _ in 0..n {
                    let key = self.string()?;
                    let item = self.value(depth + 1)?;
                    map.insert(key, item);
                }
                Value::Object(map)
            }
            tag => return Err(format!("unknown value tag {tag}")),
        })
    }

    /// An 8-byte little-endian float, which must be finite (JSON has no NaN or infinity).
    fn finite_f64(&mut self) -> Result<f64, String> {
        let raw = self.take(8)?;
        let mut b = [0u8; 8];
        b.copy_from_slice(raw);
        let f = f64::from_le_bytes(b);
        if f.is_finite() {
            Ok(f)
        } else {
            Err("non-finite number".into())
        }
    }

    /// Reads past one value, checking it like [`Reader::value`] does.
    fn skip_value(&mut self, depth: usize) -> Result<(), String> {
        match self.byte()? {
            NULL | FALSE | TRUE => {}
            U64 | I64 => {
                self.varint()?;
            }
            F64 => {
                self.finite_f64()?;
            }
            STRING => self.skip_str()?,
            ARRAY => {
                nest(depth)?;
                for _ in 0..self.count()? {
                    self.skip_value(depth + 1)?;
                }
            }
            OBJECT => {
                nest(depth)?;
                for _ in 0..self.count()? {
                    self.skip_str()?;
                    self.skip_value(depth + 1)?;
                }
            }
            tag => return Err(format!("unknown value tag {tag}")),
        }
        Ok(())
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<u64>().prop_map(|u| json!(u)),
            any::<i64>().prop_map(|i| json!(i)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            ".*".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(".*", inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn round_trips(value in arb_value()) {
            let mut buf = Vec::new();
            encode(&value, &mut buf).expect("encodes");
            prop_assert_eq!(decode(&buf).expect("decodes"), value);
        }

        #[test]
        fn garbage_never_panics_and_check_agrees_with_decode(
            bytes in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            prop_assert_eq!(check(&bytes).is_ok(), decode(&bytes).is_ok());
        }

        #[test]
        fn check_accepts_what_encode_writes(value in arb_value()) {
            let mut buf = Vec::new();
            encode(&value, &mut buf).expect("encodes");
            prop_assert!(check(&buf).is_ok());
        }

        #[test]
        fn check_agrees_with_decode_on_damaged_values(
            value in arb_value(),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let mut buf = Vec::new();
            encode(&value, &mut buf).expect("encodes");
            let i = at.index(buf.len());
            buf[i] ^= flip;
            prop_assert_eq!(check(&buf).is_ok(), decode(&buf).is_ok());
            prop_assert_eq!(check(&buf[..i]).is_ok(), decode(&buf[..i]).is_ok());
        }
    }

    #[test]
    fn number_kinds_are_kept() {
        for v in [
            json!(5),
            json!(-5),
            json!(5.0),
            json!(-0.0),
            json!(u64::MAX),
            json!(i64::MIN),
        ] {
            let mut buf = Vec::new();
            encode(&v, &mut buf).expect("encodes");
            let back = decode(&buf).expect("decodes");
            assert_eq!(back, v);
            assert_eq!(back.to_string(), v.to_string());
        }
    }

    #[test]
    fn depth_is_limited_both_ways() {
        let mut deep = json!(1);
        for _ in 0..MAX_DEPTH + 1 {
            deep = json!([deep]);
        }
        assert!(encode(&deep, &mut Vec::new()).is_err());
        let mut bytes = [ARRAY, 1].repeat(MAX_DEPTH + 1);
        bytes.push(NULL);
        assert!(decode(&bytes).is_err());
    }
}
