//! A small, strict reader for the Python pickles of CIFAR-10's python version.
//!
//! Those files were written by Python 2's cPickle with protocol 2: byte strings as
//! SHORT_BINSTRING / BINSTRING (opcodes `U` / `T`, which `candle_core::pickle` does not know), the
//! pixel array through `numpy.core.multiarray._reconstruct` + BUILD. This reader parses exactly the
//! opcodes such files use into a tree of [`Value`]s without running anything: REDUCE and BUILD
//! are kept as [`Value::Call`] and [`Value::Build`] for the caller to recognise. Anything else (a
//! newer protocol, an unknown opcode, a shared reference to a mutable object) is an error that
//! gives the byte offset.

use std::collections::HashMap;
use std::rc::Rc;

use anyhow::{bail, Result};

/// A parsed pickle object.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// A Python 2 `str` (raw bytes; the CIFAR-10 pixel data is one of these).
    Bytes(Rc<Vec<u8>>),
    Unicode(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Key-value pairs in pickle order.
    Dict(Vec<(Value, Value)>),
    /// `module.name`, as GLOBAL names it.
    Global { module: String, name: String },
    /// REDUCE, not evaluated: `callable(*args)`.
    Call { callable: Box<Value>, args: Box<Value> },
    /// BUILD, not evaluated: `obj.__setstate__(state)`.
    Build { obj: Box<Value>, state: Box<Value> },
}

impl Value {
    /// The text of a `str`/`bytes` (read as latin-1, as Python 3 reads these files) or `unicode`.
    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Bytes(b) => Some(b.iter().map(|&c| c as char).collect()),
            Value::Unicode(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// The value under a text key of a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items.iter().find(|(k, _)| k.as_text().as_deref() == Some(key)).map(|(_, v)| v),
            _ => None,
        }
    }

    /// A short description for error messages (no payloads).
    pub fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("{b}"),
            Value::Int(i) => format!("int {i}"),
            Value::Bytes(b) => format!("a {}-byte string", b.len()),
            Value::Unicode(s) => format!("unicode of {} chars", s.chars().count()),
            Value::Tuple(t) => format!("a {}-tuple", t.len()),
            Value::List(l) => format!("a list of {}", l.len()),
            Value::Dict(d) => format!("a dict of {} keys", d.len()),
            Value::Global { module, name } => format!("{module}.{name}"),
            Value::Call { callable, .. } => format!("a call of {}", callable.kind()),
            Value::Build { obj, .. } => format!("a built {}", obj.kind()),
        }
    }
}

enum Item {
    Mark,
    Value(Value),
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.bytes.len() - self.pos < n {
            bail!("the pickle ends early (byte {} of {}, {n} more needed)", self.pos, self.bytes.len());
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?))
    }
    fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.bytes[self.pos..];
        let Some(end) = rest.iter().position(|&c| c == b'\n') else {
            bail!("the pickle ends inside a GLOBAL name (byte {})", self.pos);
        };
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(s)
    }
}

/// Parses a protocol-2 pickle (as Python 2's cPickle wrote them) into its object tree.
pub fn parse(bytes: &[u8]) -> Result<Value> {
    let mut r = Reader { bytes, pos: 0 };
    let mut stack: Vec<Item> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();

    fn pop(stack: &mut Vec<Item>, at: usize) -> Result<Value> {
        match stack.pop() {
            Some(Item::Value(v)) => Ok(v),
            Some(Item::Mark) => bail!("byte {at}: a MARK where a value was expected"),
            None => bail!("byte {at}: the pickle's stack is empty"),
        }
    }
    fn pop_to_mark(stack: &mut Vec<Item>, at: usize) -> Result<Vec<Value>> {
        let Some(mark) = stack.iter().rposition(|i| matches!(i, Item::Mark)) else {
            bail!("byte {at}: no MARK on the pickle's stack");
        };
        let items = stack.split_off(mark + 1);
        stack.pop();
        Ok(items.into_iter().map(|i| if let Item::Value(v) = i { v } else { unreachable!() }).collect())
    }
    fn top(stack: &mut [Item], at: usize) -> Result<&mut Value> {
        match stack.last_mut() {
            Some(Item::Value(v)) => Ok(v),
            _ => bail!("byte {at}: no value on the pickle's stack"),
        }
    }

    loop {
        let at = r.pos;
        let op = r.u8()?;
        match op {
            0x80 => {
                let proto = r.u8()?;
                if proto != 2 {
                    bail!("pickle protocol {proto}; expected 2 (the protocol of the CIFAR-10 python files)");
                }
            }
            b'}' => stack.push(Item::Value(Value::Dict(vec![]))),
            b']' => stack.push(Item::Value(Value::List(vec![]))),
            b')' => stack.push(Item::Value(Value::Tuple(vec![]))),
            b'(' => stack.push(Item::Mark),
            b'N' => stack.push(Item::Value(Value::None)),
            0x88 => stack.push(Item::Value(Value::Bool(true))),
            0x89 => stack.push(Item::Value(Value::Bool(false))),
            b'K' => {
                let v = r.u8()?;
                stack.push(Item::Value(Value::Int(v.into())))
            }
            b'M' => {
                let v = r.u16()?;
                stack.push(Item::Value(Value::Int(v.into())))
            }
            b'J' => {
                let v = r.i32()?;
                stack.push(Item::Value(Value::Int(v.into())))
            }
            b'U' | b'T' => {
                let n = if op == b'U' { r.u8()? as i64 } else { r.i32()? as i64 };
                if n < 0 {
                    bail!("byte {at}: a string of negative length {n}");
                }
                let s = r.take(n as usize)?.to_vec();
                stack.push(Item::Value(Value::Bytes(Rc::new(s))))
            }
            b'X' => {
                let n = r.u32()? as usize;
                let s = std::str::from_utf8(r.take(n)?).map_err(|_| anyhow::anyhow!("byte {at}: unicode that is not UTF-8"))?;
                stack.push(Item::Value(Value::Unicode(s.to_string())))
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(Item::Value(Value::Global { module, name }))
            }
            b'q' | b'r' => {
                let id = if op == b'q' { r.u8()? as u32 } else { r.u32()? };
                let v = top(&mut stack, at)?.clone();
                memo.insert(id, v);
            }
            b'h' | b'j' => {
                let id = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
                let Some(v) = memo.get(&id) else {
                    bail!("byte {at}: memo entry {id} was never stored");
                };
                // The memo holds a copy, so an object changed after it was stored (a list, a dict,
                // a built object) would come back stale: those files never share one.
                if matches!(v, Value::List(_) | Value::Dict(_) | Value::Call { .. } | Value::Build { .. }) {
                    bail!("byte {at}: a second reference to {} (memo {id}) is not supported", v.kind());
                }
                stack.push(Item::Value(v.clone()))
            }
            b't' => {
                let items = pop_to_mark(&mut stack, at)?;
                stack.push(Item::Value(Value::Tuple(items)))
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = (0..n).map(|_| pop(&mut stack, at)).collect::<Result<Vec<_>>>()?;
                items.reverse();
                stack.push(Item::Value(Value::Tuple(items)))
            }
            b'a' => {
                let v = pop(&mut stack, at)?;
                match top(&mut stack, at)? {
                    Value::List(l) => l.push(v),
                    other => bail!("byte {at}: APPEND to {}", other.kind()),
                }
            }
            b'e' => {
                let items = pop_to_mark(&mut stack, at)?;
                match top(&mut stack, at)? {
                    Value::List(l) => l.extend(items),
                    other => bail!("byte {at}: APPENDS to {}", other.kind()),
                }
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = pop(&mut stack, at)?;
                    let k = pop(&mut stack, at)?;
                    vec![k, v]
                } else {
                    pop_to_mark(&mut stack, at)?
                };
                if items.len() % 2 != 0 {
                    bail!("byte {at}: SETITEMS with an odd number of items");
                }
                match top(&mut stack, at)? {
                    Value::Dict(d) => {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                    other => bail!("byte {at}: SETITEM on {}", other.kind()),
                }
            }
            b'R' => {
                let args = pop(&mut stack, at)?;
                let callable = pop(&mut stack, at)?;
                stack.push(Item::Value(Value::Call { callable: Box::new(callable), args: Box::new(args) }))
            }
            b'b' => {
                let state = pop(&mut stack, at)?;
                let obj = pop(&mut stack, at)?;
                stack.push(Item::Value(Value::Build { obj: Box::new(obj), state: Box::new(state) }))
            }
            b'.' => {
                let v = pop(&mut stack, at)?;
                if !stack.is_empty() {
                    bail!("byte {at}: STOP with {} more items on the stack", stack.len());
                }
                return Ok(v);
            }
            other => bail!(
                "byte {at}: unsupported pickle opcode 0x{other:02x} ({:?}); expected a Python-2 protocol-2 pickle",
                other as char
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python2_strings_lists_and_calls() -> Result<()> {
        // {'k': [1, 300, -2, 'ab'], u'u': (None, True), 'g': numpy.dtype('u1')} as cPickle writes it.
        let mut p = b"\x80\x02}q\x00(U\x01kq\x01]q\x02(K\x01M\x2c\x01J\xfe\xff\xff\xffT\x02\x00\x00\x00abq\x03eX\x01\x00\x00\x00u".to_vec();
        p.extend_from_slice(b"N\x88\x86U\x01gcnumpy\ndtype\nU\x02u1\x85Rh\x03\x85bu.");
        let v = parse(&p)?;
        let ab = Value::Bytes(Rc::new(b"ab".to_vec()));
        assert_eq!(v.get("k"), Some(&Value::List(vec![Value::Int(1), Value::Int(300), Value::Int(-2), ab.clone()])));
        assert_eq!(v.get("u"), Some(&Value::Tuple(vec![Value::None, Value::Bool(true)])));
        let dtype = Value::Call {
            callable: Box::new(Value::Global { module: "numpy".into(), name: "dtype".into() }),
            args: Box::new(Value::Tuple(vec![Value::Bytes(Rc::new(b"u1".to_vec()))])),
        };
        assert_eq!(v.get("g"), Some(&Value::Build { obj: Box::new(dtype), state: Box::new(Value::Tuple(vec![ab])) }));
        Ok(())
    }

    #[test]
    fn bad_pickles_say_where() {
        let cases: [(&[u8], &str); 5] = [
            (b"\x80\x04\x95", "protocol 4"),
            (b"\x80\x02}q\x00(U\x05ab", "ends early"),
            (b"\x80\x02]q\x00h\x00.", "second reference to a list"),
            (b"\x80\x02Z", "byte 2: unsupported pickle opcode 0x5a"),
            (b"\x80\x02K\x01K\x02.", "STOP with 1 more"),
        ];
        for (bytes, expected) in cases {
            let err = parse(bytes).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
    }
}
