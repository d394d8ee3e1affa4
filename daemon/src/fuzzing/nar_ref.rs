//! An independent reference parser of the NAR grammar (`core::nar`'s module comment), written
//! as plain recursive descent over a slice, for the `nar` target to compare the streaming
//! validator against. Deliberately naive: it shares no code with `core::nar` but the limits.

use super::{MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN};

/// What an accepted NAR held, counted independently of the validator.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub(crate) files: u64,
    pub(crate) executables: u64,
    pub(crate) directories: u64,
    pub(crate) symlinks: u64,
    pub(crate) contents_size: u64,
    /// Every name and target is UTF-8 (what `parse_nar` also requires).
    pub(crate) utf8: bool,
}

struct Parser<'a> {
    rest: &'a [u8],
    counts: Counts,
}

/// Parses `data` as exactly one NAR.
pub(crate) fn parse(data: &[u8]) -> Result<Counts, String> {
    let mut p = Parser {
        rest: data,
        counts: Counts {
            utf8: true,
            ..Counts::default()
        },
    };
    p.expect(b"nix-archive-1")?;
    p.node(0)?;
    if !p.rest.is_empty() {
        return Err("trailing data".into());
    }
    Ok(p.counts)
}

impl<'a> Parser<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        if n > self.rest.len() as u64 {
            return Err("truncated".into());
        }
        let (a, b) = self.rest.split_at(n as usize);
        self.rest = b;
        Ok(a)
    }

    /// One string of at most `max` bytes, with its zero padding.
    fn string(&mut self, max: u64) -> Result<&'a [u8], String> {
        let len = u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| "length")?);
        if len > max {
            return Err(format!("string of {len} bytes"));
        }
        let s = self.take(len)?;
        let pad = (8 - len % 8) % 8;
        if self.take(pad)?.iter().any(|&b| b != 0) {
            return Err("non-zero padding".into());
        }
        Ok(s)
    }

    fn expect(&mut self, token: &[u8]) -> Result<(), String> {
        let s = self.string(64)?;
        if s == token {
            Ok(())
        } else {
            Err(format!("expected {:?}", String::from_utf8_lossy(token)))
        }
    }

    /// `depth`: directories open around this node.
    fn node(&mut self, depth: usize) -> Result<(), String> {
        self.expect(b"(")?;
        self.expect(b"type")?;
        match self.string(64)? {
            b"regular" => {
                let mut tag = self.string(64)?;
                let mut executable = false;
                if tag == b"executable" {
                    self.expect(b"")?;
                    executable = true;
                    tag = self.string(64)?;
                }
                if tag != b"contents" {
                    return Err("expected contents".into());
                }
                let contents = self.string(u64::MAX)?;
                self.counts.files += 1;
                self.counts.executables += u64::from(executable);
                self.counts.contents_size += contents.len() as u64;
            }
            b"symlink" => {
                self.expect(b"target")?;
                let target = self.string(MAX_TARGET_LEN)?;
                if target.is_empty() || target.contains(&0) {
                    return Err("bad target".into());
                }
                self.counts.utf8 &= std::str::from_utf8(target).is_ok();
                self.counts.symlinks += 1;
            }
            b"directory" => {
                if depth + 1 > MAX_DEPTH {
                    return Err("too deep".into());
                }
                self.counts.directories += 1;
                let mut prev: Option<&[u8]> = None;
                loop {
                    match self.string(64)? {
                        b")" => return Ok(()),
                        b"entry" => {}
                        _ => return Err("expected entry or )".into()),
                    }
                    self.expect(b"(")?;
                    self.expect(b"name")?;
                    let name = self.string(MAX_NAME_LEN)?;
                    let bad = name.is_empty()
                        || name == b"."
                        || name == b".."
                        || name.contains(&b'/')
                        || name.contains(&0);
                    if bad || prev.is_some_and(|p| p >= name) {
                        return Err("bad or unsorted name".into());
                    }
                    self.counts.utf8 &= std::str::from_utf8(name).is_ok();
                    prev = Some(name);
                    self.expect(b"node")?;
                    self.node(depth + 1)?;
                    self.expect(b")")?;
                }
            }
            _ => return Err("unknown type".into()),
        }
        self.expect(b")")
    }
}
