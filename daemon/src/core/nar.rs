//! The NAR (Nix ARchive) format: a push-style streaming validator, a streaming writer, and an
//! in-memory tree with a writer and parser for tests and tools.
//!
//! A NAR is a sequence of strings, each a little-endian `u64` length, the bytes, and zero padding
//! to a multiple of 8. The grammar (as Nix's `src/libutil/archive.cc` parses and dumps it):
//!
//! ```text
//! nar       = "nix-archive-1" node
//! node      = "(" "type" ( regular | symlink | directory ) ")"
//! regular   = "regular" [ "executable" "" ] "contents" <bytes>
//! symlink   = "symlink" "target" <target>
//! directory = "directory" { "entry" "(" "name" <name> "node" node ")" }
//! ```
//!
//! Rules enforced everywhere in this module: entry names strictly increase in byte order (so no
//! duplicates), are non-empty, not `.` or `..`, and contain neither `/` nor NUL; padding is zero;
//! nothing follows the root node. Beyond Nix, and to keep memory bounded, names are at most
//! [`MAX_NAME_LEN`] bytes, symlink targets non-empty, NUL-free and at most [`MAX_TARGET_LEN`]
//! bytes, and directories nest at most [`MAX_DEPTH`] deep.
//!
//! [`NarValidator`] is the one implementation of these rules; [`parse_nar`] and [`NarWriter`] run
//! it too, so what we write is exactly what we accept. It skips file contents by count (no
//! per-byte work, no buffering), so it can run over every byte of a multi-GB ingest.
//!
//! Pure code: no files, no network; the only I/O is `std::io::Write` on a writer the caller hands
//! in.

use std::collections::BTreeMap;
use std::io::{self, Write};

/// The string every NAR starts with.
pub const NAR_MAGIC: &[u8] = b"nix-archive-1";
/// Longest accepted entry name, in bytes (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: u64 = 255;
/// Longest accepted symlink target, in bytes (Linux `PATH_MAX`).
pub const MAX_TARGET_LEN: u64 = 4096;
/// Deepest accepted directory nesting (the root directory is depth 1).
pub const MAX_DEPTH: usize = 2048;
/// Longest grammar token (`nix-archive-1` is the longest, 13 bytes).
const MAX_TOKEN_LEN: u64 = 16;

/// Why a byte stream is not a valid NAR. `offset` is the position in the stream of the string
/// (its length field) or byte at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarError {
    #[error("at byte {offset}: not a NAR (does not start with \"nix-archive-1\")")]
    BadMagic { offset: u64 },
    #[error("at byte {offset}: expected {expected}, found {found:?}")]
    UnexpectedToken {
        offset: u64,
        expected: &'static str,
        found: String,
    },
    #[error("at byte {offset}: unknown node type {found:?}")]
    UnknownType { offset: u64, found: String },
    #[error("at byte {offset}: directory entry {name:?} does not sort strictly after {prev:?}")]
    UnsortedEntries {
        offset: u64,
        prev: String,
        name: String,
    },
    #[error("at byte {offset}: invalid entry name {name:?}")]
    InvalidName { offset: u64, name: String },
    #[error("at byte {offset}: invalid symlink target {target:?}")]
    InvalidTarget { offset: u64, target: String },
    #[error("at byte {offset}: {what} is not valid UTF-8")]
    NonUtf8 { offset: u64, what: &'static str },
    #[error("at byte {offset}: non-zero padding byte")]
    NonZeroPadding { offset: u64 },
    #[error("at byte {offset}: {what} of {len} bytes is longer than the limit of {max}")]
    TooLong {
        offset: u64,
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("at byte {offset}: directories nested deeper than {max}")]
    TooDeep { offset: u64, max: usize },
    #[error("NAR truncated after {offset} bytes")]
    Truncated { offset: u64 },
    #[error("at byte {offset}: data after the end of the NAR")]
    TrailingData { offset: u64 },
}

/// What a valid NAR contained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NarSummary {
    /// Total length of the NAR in bytes.
    pub nar_size: u64,
    /// Regular files, executable or not.
    pub files: u64,
    /// Regular files with the executable bit (also counted in `files`).
    pub executables: u64,
    pub directories: u64,
    pub symlinks: u64,
    /// Sum of the sizes of all regular files.
    pub contents_size: u64,
}

/// Receives the structure of a NAR as [`NarValidator::feed_with`] validates it. Events arrive in
/// NAR order; names and targets have already passed the rules. All methods default to no-ops.
pub trait NarVisitor {
    /// A directory node starts; its entries follow, then [`NarVisitor::end_directory`].
    fn directory(&mut self) {}
    /// The next node is the entry `name` of the innermost open directory.
    fn entry(&mut self, _name: &[u8]) {}
    /// The innermost open directory ends.
    fn end_directory(&mut self) {}
    /// A regular file of `size` bytes starts; [`NarVisitor::contents`] follows with its bytes.
    fn regular(&mut self, _executable: bool, _size: u64) {}
    /// The next piece of the current regular file's contents (never empty).
    fn contents(&mut self, _data: &[u8]) {}
    /// All contents of the current regular file have arrived.
    fn end_regular(&mut self) {}
    /// A symlink node.
    fn symlink(&mut self, _target: &[u8]) {}
}

/// The visitor that ignores everything: plain validation.
struct Ignore;
impl NarVisitor for Ignore {}

/// What the next string (or length, for contents) of the NAR must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Magic,
    OpenNode,
    TypeTag,
    TypeValue,
    /// `"executable"` or `"contents"`.
    RegularTag,
    ExecutableValue,
    ContentsTag,
    ContentsLen {
        executable: bool,
    },
    Contents,
    CloseNode,
    TargetTag,
    TargetValue,
    /// `"entry"` or `")"`.
    DirItem,
    EntryOpen,
    NameTag,
    NameValue,
    NodeTag,
    EntryClose,
    Done,
}

impl Want {
    /// How a token expected here is described in errors.
    fn expected(self) -> &'static str {
        match self {
            Want::Magic => "\"nix-archive-1\"",
            Want::OpenNode | Want::EntryOpen => "\"(\"",
            Want::TypeTag => "\"type\"",
            Want::TypeValue => "\"regular\", \"symlink\" or \"directory\"",
            Want::RegularTag => "\"executable\" or \"contents\"",
            Want::ExecutableValue => "\"\"",
            Want::ContentsTag => "\"contents\"",
            Want::ContentsLen { .. } | Want::Contents => "file contents",
            Want::CloseNode | Want::EntryClose => "\")\"",
            Want::TargetTag => "\"target\"",
            Want::TargetValue => "a symlink target",
            Want::DirItem => "\"entry\" or \")\"",
            Want::NameTag => "\"name\"",
            Want::NameValue => "an entry name",
            Want::NodeTag => "\"node\"",
            Want::Done => "end of NAR",
        }
    }
}

/// Where we are inside the current string.
#[derive(Debug, Clone, Copy)]
enum Low {
    /// Reading a `u64` length; `have` of its 8 bytes are in `buf`.
    Len { buf: [u8; 8], have: u8 },
    /// Reading `len` string bytes into `NarValidator::str_buf`.
    Str { len: u64 },
    /// Skipping file contents, then `pad` padding bytes.
    Contents { remaining: u64, pad: u8 },
    /// Checking `remaining` zero padding bytes.
    Pad { remaining: u8 },
}

const LEN_START: Low = Low::Len {
    buf: [0; 8],
    have: 0,
};

/// Padding after a string of `len` bytes.
fn pad_len(len: u64) -> u8 {
    ((8 - len % 8) % 8) as u8
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A push-style streaming NAR validator: [`feed`](Self::feed) it the NAR in pieces of any size,
/// then [`finish`](Self::finish). Memory is bounded (one name per open directory, one string of
/// at most [`MAX_TARGET_LEN`] bytes); file contents are skipped by count.
///
/// After the first error every later call returns that same error.
#[derive(Debug, Clone)]
pub struct NarValidator {
    want: Want,
    low: Low,
    /// Bytes consumed so far.
    offset: u64,
    /// Offset of the length field of the string being read.
    item_start: u64,
    /// The string being read (tokens, names, targets only; never contents).
    str_buf: Vec<u8>,
    /// The last entry name of each open directory (empty before the first entry).
    dirs: Vec<Vec<u8>>,
    /// Reuse of popped directories' name buffers.
    spare: Vec<Vec<u8>>,
    /// Require names and targets to be UTF-8 (for [`parse_nar`], whose tree holds `String`s).
    require_utf8: bool,
    summary: NarSummary,
    error: Option<NarError>,
}

impl Default for NarValidator {
    fn default() -> Self {
        Self::new()
    }
}

impl NarValidator {
    pub fn new() -> Self {
        NarValidator {
            want: Want::Magic,
            low: LEN_START,
            offset: 0,
            item_start: 0,
            str_buf: Vec::new(),
            dirs: Vec::new(),
            spare: Vec::new(),
            require_utf8: false,
            summary: NarSummary::default(),
            error: None,
        }
    }

    /// Bytes fed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// True once a complete NAR has been seen (any further byte is an error).
    pub fn is_done(&self) -> bool {
        self.want == Want::Done && self.error.is_none()
    }

    /// Validates the next piece of the NAR.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), NarError> {
        self.feed_with(data, &mut Ignore)
    }

    /// Validates the next piece of the NAR, reporting its structure to `visitor`.
    pub fn feed_with<V: NarVisitor>(
        &mut self,
        data: &[u8],
        visitor: &mut V,
    ) -> Result<(), NarError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let result = self.run(data, visitor);
        if let Err(e) = &result {
            self.error = Some(e.clone());
        }
        result
    }

    /// Ends the stream: fails unless exactly one complete NAR was fed.
    pub fn finish(self) -> Result<NarSummary, NarError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.want != Want::Done {
            return Err(NarError::Truncated {
                offset: self.offset,
            });
        }
        Ok(NarSummary {
            nar_size: self.offset,
            ..self.summary
        })
    }

    fn run<V: NarVisitor>(&mut self, mut data: &[u8], v: &mut V) -> Result<(), NarError> {
        while !data.is_empty() {
            match self.low {
                Low::Len { mut buf, mut have } => {
                    if self.want == Want::Done {
                        return Err(NarError::TrailingData {
                            offset: self.offset,
                        });
                    }
                    if have == 0 {
                        self.item_start = self.offset;
                    }
                    let n = (8 - have as usize).min(data.len());
                    buf[have as usize..have as usize + n].copy_from_slice(&data[..n]);
                    have += n as u8;
                    self.advance(&mut data, n);
                    if have == 8 {
                        self.low = LEN_START;
                        self.on_len(u64::from_le_bytes(buf), v)?;
                    } else {
                        self.low = Low::Len { buf, have };
                    }
                }
                Low::Str { len } => {
                    let missing = len - self.str_buf.len() as u64;
                    let n = missing.min(data.len() as u64) as usize;
                    self.str_buf.extend_from_slice(&data[..n]);
                    self.advance(&mut data, n);
                    if n as u64 == missing {
                        self.end_string(pad_len(len), v)?;
                    }
                }
                Low::Contents { remaining, pad } => {
                    let n = remaining.min(data.len() as u64) as usize;
                    v.contents(&data[..n]);
                    self.advance(&mut data, n);
                    if n as u64 == remaining {
                        self.end_string(pad, v)?;
                    } else {
                        self.low = Low::Contents {
                            remaining: remaining - n as u64,
                            pad,
                        };
                    }
                }
                Low::Pad { remaining } => {
                    let n = (remaining as usize).min(data.len());
                    if let Some(i) = data[..n].iter().position(|&b| b != 0) {
                        return Err(NarError::NonZeroPadding {
                            offset: self.offset + i as u64,
                        });
                    }
                    self.advance(&mut data, n);
                    if n == remaining as usize {
                        self.low = LEN_START;
                        self.dispatch(v)?;
                    } else {
                        self.low = Low::Pad {
                            remaining: remaining - n as u8,
                        };
                    }
                }
            }
        }
        Ok(())
    }

    fn advance(&mut self, data: &mut &[u8], n: usize) {
        *data = &data[n..];
        self.offset += n as u64;
    }

    /// A string's (or the contents') bytes are complete: check `pad` padding bytes, then act.
    fn end_string<V: NarVisitor>(&mut self, pad: u8, v: &mut V) -> Result<(), NarError> {
        if pad == 0 {
            self.low = LEN_START;
            self.dispatch(v)
        } else {
            self.low = Low::Pad { remaining: pad };
            Ok(())
        }
    }

    /// A length field is complete.
    fn on_len<V: NarVisitor>(&mut self, len: u64, v: &mut V) -> Result<(), NarError> {
        let offset = self.item_start;
        let max = match self.want {
            Want::ContentsLen { executable } => {
                self.summary.files += 1;
                self.summary.executables += u64::from(executable);
                self.summary.contents_size = self.summary.contents_size.saturating_add(len);
                v.regular(executable, len);
                self.want = Want::Contents;
                if len == 0 {
                    return self.dispatch(v);
                }
                self.low = Low::Contents {
                    remaining: len,
                    pad: pad_len(len),
                };
                return Ok(());
            }
            Want::Magic if len != NAR_MAGIC.len() as u64 => {
                return Err(NarError::BadMagic { offset })
            }
            Want::NameValue => MAX_NAME_LEN,
            Want::TargetValue => MAX_TARGET_LEN,
            _ => MAX_TOKEN_LEN,
        };
        if len > max {
            return Err(match self.want {
                Want::NameValue => NarError::TooLong {
                    offset,
                    what: "entry name",
                    len,
                    max,
                },
                Want::TargetValue => NarError::TooLong {
                    offset,
                    what: "symlink target",
                    len,
                    max,
                },
                Want::TypeValue => NarError::UnknownType {
                    offset,
                    found: format!("<{len}-byte string>"),
                },
                want => NarError::UnexpectedToken {
                    offset,
                    expected: want.expected(),
                    found: format!("<{len}-byte string>"),
                },
            });
        }
        self.str_buf.clear();
        if len == 0 {
            return self.dispatch(v);
        }
        self.low = Low::Str { len };
        Ok(())
    }

    /// Checks that the string just read is `token`, then moves to `next`.
    fn expect(&mut self, token: &[u8], next: Want) -> Result<(), NarError> {
        if self.str_buf == token {
            self.want = next;
            Ok(())
        } else {
            Err(self.unexpected())
        }
    }

    fn unexpected(&self) -> NarError {
        NarError::UnexpectedToken {
            offset: self.item_start,
            expected: self.want.expected(),
            found: lossy(&self.str_buf),
        }
    }

    /// The current node's closing `")"` was read.
    fn end_node(&mut self) {
        self.want = if self.dirs.is_empty() {
            Want::Done
        } else {
            Want::EntryClose
        };
    }

    /// A complete string (in `str_buf`, with its padding checked) or the end of file contents.
    fn dispatch<V: NarVisitor>(&mut self, v: &mut V) -> Result<(), NarError> {
        let offset = self.item_start;
        match self.want {
            Want::Magic => {
                if self.str_buf != NAR_MAGIC {
                    return Err(NarError::BadMagic { offset });
                }
                self.want = Want::OpenNode;
            }
            Want::OpenNode => self.expect(b"(", Want::TypeTag)?,
            Want::TypeTag => self.expect(b"type", Want::TypeValue)?,
            Want::TypeValue => match self.str_buf.as_slice() {
                b"regular" => self.want = Want::RegularTag,
                b"symlink" => self.want = Want::TargetTag,
                b"directory" => {
                    if self.dirs.len() >= MAX_DEPTH {
                        return Err(NarError::TooDeep {
                            offset,
                            max: MAX_DEPTH,
                        });
                    }
                    let mut last = self.spare.pop().unwrap_or_default();
                    last.clear();
                    self.dirs.push(last);
                    self.summary.directories += 1;
                    v.directory();
                    self.want = Want::DirItem;
                }
                other => {
                    return Err(NarError::UnknownType {
                        offset,
                        found: lossy(other),
                    })
                }
            },
            Want::RegularTag => match self.str_buf.as_slice() {
                b"executable" => self.want = Want::ExecutableValue,
                b"contents" => self.want = Want::ContentsLen { executable: false },
                _ => return Err(self.unexpected()),
            },
            Want::ExecutableValue => self.expect(b"", Want::ContentsTag)?,
            Want::ContentsTag => {
                self.expect(b"contents", Want::ContentsLen { executable: true })?
            }
            // Lengths go to `on_len`, never here.
            Want::ContentsLen { .. } => return Err(self.unexpected()),
            Want::Contents => {
                v.end_regular();
                self.want = Want::CloseNode;
            }
            Want::CloseNode => {
                self.expect(b")", Want::CloseNode)?;
                self.end_node();
            }
            Want::TargetTag => self.expect(b"target", Want::TargetValue)?,
            Want::TargetValue => {
                let target = self.str_buf.as_slice();
                if target.is_empty() || target.contains(&0) {
                    return Err(NarError::InvalidTarget {
                        offset,
                        target: lossy(target),
                    });
                }
                if self.require_utf8 && std::str::from_utf8(target).is_err() {
                    return Err(NarError::NonUtf8 {
                        offset,
                        what: "symlink target",
                    });
                }
                self.summary.symlinks += 1;
                v.symlink(target);
                self.want = Want::CloseNode;
            }
            Want::DirItem => match self.str_buf.as_slice() {
                b"entry" => self.want = Want::EntryOpen,
                b")" => {
                    if let Some(last) = self.dirs.pop() {
                        self.spare.push(last);
                    }
                    v.end_directory();
                    self.end_node();
                }
                _ => return Err(self.unexpected()),
            },
            Want::EntryOpen => self.expect(b"(", Want::NameTag)?,
            Want::NameTag => self.expect(b"name", Want::NameValue)?,
            Want::NameValue => {
                let name = self.str_buf.as_slice();
                if name.is_empty()
                    || name == b"."
                    || name == b".."
                    || name.contains(&b'/')
                    || name.contains(&0)
                {
                    return Err(NarError::InvalidName {
                        offset,
                        name: lossy(name),
                    });
                }
                if self.require_utf8 && std::str::from_utf8(name).is_err() {
                    return Err(NarError::NonUtf8 {
                        offset,
                        what: "entry name",
                    });
                }
                // `dirs` is non-empty: `NameValue` is only reachable inside a directory.
                if let Some(last) = self.dirs.last_mut() {
                    if name <= last.as_slice() {
                        return Err(NarError::UnsortedEntries {
                            offset,
                            prev: lossy(last),
                            name: lossy(name),
                        });
                    }
                    last.clear();
                    last.extend_from_slice(name);
                }
                v.entry(name);
                self.want = Want::NodeTag;
            }
            Want::NodeTag => self.expect(b"node", Want::OpenNode)?,
            Want::EntryClose => self.expect(b")", Want::DirItem)?,
            // `run` reports bytes after the end before they get here.
            Want::Done => {
                return Err(NarError::TrailingData {
                    offset: self.item_start,
                })
            }
        }
        Ok(())
    }
}

/// A file system object as a NAR holds it, fully in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Regular { executable: bool, contents: Vec<u8> },
    Symlink { target: String },
    Directory(BTreeMap<String, Node>),
}

/// Builds a [`Node`] from visitor events.
#[derive(Default)]
struct TreeBuilder {
    /// Open directories, each with the entry name it will be stored under (`None` for the root).
    open: Vec<(Option<String>, BTreeMap<String, Node>)>,
    /// The entry name of the node being read.
    name: Option<String>,
    /// The regular file being read.
    file: Option<(bool, Vec<u8>)>,
    root: Option<Node>,
}

impl TreeBuilder {
    fn place(&mut self, name: Option<String>, node: Node) {
        match (name, self.open.last_mut()) {
            (Some(name), Some((_, entries))) => {
                entries.insert(name, node);
            }
            _ => self.root = Some(node),
        }
    }
}

impl NarVisitor for TreeBuilder {
    fn directory(&mut self) {
        self.open.push((self.name.take(), BTreeMap::new()));
    }
    fn entry(&mut self, name: &[u8]) {
        // The validator has checked UTF-8 (`require_utf8`), so this is exact.
        self.name = Some(lossy(name));
    }
    fn end_directory(&mut self) {
        if let Some((name, entries)) = self.open.pop() {
            self.place(name, Node::Directory(entries));
        }
    }
    fn regular(&mut self, executable: bool, _size: u64) {
        // No `with_capacity(size)`: the size is untrusted until the contents arrive.
        self.file = Some((executable, Vec::new()));
    }
    fn contents(&mut self, data: &[u8]) {
        if let Some((_, contents)) = &mut self.file {
            contents.extend_from_slice(data);
        }
    }
    fn end_regular(&mut self) {
        if let Some((executable, contents)) = self.file.take() {
            let name = self.name.take();
            self.place(
                name,
                Node::Regular {
                    executable,
                    contents,
                },
            );
        }
    }
    fn symlink(&mut self, target: &[u8]) {
        let name = self.name.take();
        self.place(
            name,
            Node::Symlink {
                target: lossy(target),
            },
        );
    }
}

/// Parses a whole NAR held in memory, with the same rules as [`NarValidator`], plus: names and
/// targets must be UTF-8 (the tree holds `String`s).
pub fn parse_nar(bytes: &[u8]) -> Result<Node, NarError> {
    let mut validator = NarValidator::new();
    validator.require_utf8 = true;
    let mut builder = TreeBuilder::default();
    validator.feed_with(bytes, &mut builder)?;
    validator.finish()?;
    builder.root.ok_or(NarError::Truncated {
        offset: bytes.len() as u64,
    })
}

/// Writes `node` as a NAR. Fails with `InvalidInput` if the tree breaks the NAR rules (e.g. an
/// entry name containing `/`, an empty symlink target).
pub fn write_nar<W: Write>(w: &mut W, node: &Node) -> io::Result<()> {
    let mut writer = NarWriter::new(w);
    write_node(&mut writer, node)?;
    writer.finish()?;
    Ok(())
}

fn write_node<W: Write>(writer: &mut NarWriter<W>, node: &Node) -> io::Result<()> {
    match node {
        Node::Regular {
            executable,
            contents,
        } => {
            writer.regular(*executable, contents.len() as u64)?;
            writer.write_contents(contents)?;
            writer.end_regular()
        }
        Node::Symlink { target } => writer.symlink(target.as_bytes()),
        Node::Directory(entries) => {
            writer.begin_directory()?;
            for (name, child) in entries {
                writer.entry(name.as_bytes())?;
                write_node(writer, child)?;
                writer.end_entry()?;
            }
            writer.end_directory()
        }
    }
}

fn invalid_input(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

/// Appends a NAR string.
fn put_str(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s);
    buf.resize(buf.len() + pad_len(s.len() as u64) as usize, 0);
}

/// A streaming NAR writer: the tree is described by calls, contents are streamed.
///
/// ```text
/// begin_directory
///   entry(name) <node> end_entry      (names in strictly increasing byte order)
/// end_directory
/// regular(executable, size) write_contents* end_regular
/// symlink(target)
/// ```
///
/// Every byte goes through a [`NarValidator`] before it reaches `W`, so a call that would break
/// the NAR rules fails with `InvalidInput` (and writes nothing); the writer then stays failed.
/// [`finish`](Self::finish) fails if the NAR is incomplete. Each call makes one `write_all`, so
/// wrap an unbuffered `W` in a `BufWriter`.
pub struct NarWriter<W: Write> {
    w: W,
    validator: NarValidator,
    buf: Vec<u8>,
    started: bool,
    /// For a regular file being written: (bytes still due, declared size).
    file: Option<(u64, u64)>,
}

impl<W: Write> NarWriter<W> {
    /// A writer that will write one NAR to `w`; nothing is written before the first node.
    pub fn new(w: W) -> Self {
        NarWriter {
            w,
            validator: NarValidator::new(),
            buf: Vec::with_capacity(128),
            started: false,
            file: None,
        }
    }

    /// Starts `buf` for a call, with the magic if this is the first.
    fn begin(&mut self) -> io::Result<()> {
        if self.file.is_some() {
            return Err(invalid_input(
                "NAR writer: regular file not ended (end_regular)",
            ));
        }
        self.buf.clear();
        if !self.started {
            put_str(&mut self.buf, NAR_MAGIC);
        }
        Ok(())
    }

    /// Validates and writes `buf`.
    fn emit(&mut self) -> io::Result<()> {
        self.validator.feed(&self.buf).map_err(invalid_input)?;
        self.started = true;
        self.w.write_all(&self.buf)
    }

    fn tokens(&mut self, tokens: &[&[u8]]) -> io::Result<()> {
        self.begin()?;
        for t in tokens {
            put_str(&mut self.buf, t);
        }
        self.emit()
    }

    /// Starts a directory node.
    pub fn begin_directory(&mut self) -> io::Result<()> {
        self.tokens(&[b"(", b"type", b"directory"])
    }

    /// Starts the entry `name` of the current directory; its node follows.
    pub fn entry(&mut self, name: &[u8]) -> io::Result<()> {
        self.tokens(&[b"entry", b"(", b"name", name, b"node"])
    }

    /// Ends the current entry (after its node).
    pub fn end_entry(&mut self) -> io::Result<()> {
        self.tokens(&[b")"])
    }

    /// Ends the current directory node.
    pub fn end_directory(&mut self) -> io::Result<()> {
        self.tokens(&[b")"])
    }

    /// Starts a regular file of exactly `size` bytes; write them with
    /// [`write_contents`](Self::write_contents), then call [`end_regular`](Self::end_regular).
    pub fn regular(&mut self, executable: bool, size: u64) -> io::Result<()> {
        self.begin()?;
        for t in [b"(" as &[u8], b"type", b"regular"] {
            put_str(&mut self.buf, t);
        }
        if executable {
            put_str(&mut self.buf, b"executable");
            put_str(&mut self.buf, b"");
        }
        put_str(&mut self.buf, b"contents");
        self.buf.extend_from_slice(&size.to_le_bytes());
        self.emit()?;
        self.file = Some((size, size));
        Ok(())
    }

    /// Writes the next piece of the current regular file.
    pub fn write_contents(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.file {
            Some((due, _)) if data.len() as u64 <= *due => {
                *due -= data.len() as u64;
                self.validator.feed(data).map_err(invalid_input)?;
                self.w.write_all(data)
            }
            Some(_) => Err(invalid_input(
                "NAR writer: more contents than the declared size",
            )),
            None => Err(invalid_input("NAR writer: contents outside a regular file")),
        }
    }

    /// Ends the current regular file; all its declared bytes must have been written.
    pub fn end_regular(&mut self) -> io::Result<()> {
        let size = match self.file {
            Some((0, size)) => size,
            Some(_) => {
                return Err(invalid_input(
                    "NAR writer: fewer contents than the declared size",
                ))
            }
            None => return Err(invalid_input("NAR writer: no regular file to end")),
        };
        self.file = None;
        self.buf.clear();
        self.buf.resize(pad_len(size) as usize, 0);
        put_str(&mut self.buf, b")");
        self.emit()
    }

    /// Writes a symlink node.
    pub fn symlink(&mut self, target: &[u8]) -> io::Result<()> {
        self.tokens(&[b"(", b"type", b"symlink", b"target", target, b")"])
    }

    /// Checks the NAR is complete, flushes, and returns the writer and what was written.
    pub fn finish(mut self) -> io::Result<(W, NarSummary)> {
        let summary = self.validator.finish().map_err(invalid_input)?;
        self.w.flush()?;
        Ok((self.w, summary))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::{Digest, Sha256};

    const REGULAR: &[u8] = include_bytes!("../../../testdata/nar/regular.nar");
    const EXECUTABLE: &[u8] = include_bytes!("../../../testdata/nar/executable.nar");
    const SYMLINK: &[u8] = include_bytes!("../../../testdata/nar/symlink.nar");
    const EMPTY: &[u8] = include_bytes!("../../../testdata/nar/empty.nar");
    const EMPTYDIR: &[u8] = include_bytes!("../../../testdata/nar/emptydir.nar");
    const TREE: &[u8] = include_bytes!("../../../testdata/nar/tree.nar");

    fn reg(executable: bool, contents: &[u8]) -> Node {
        Node::Regular {
            executable,
            contents: contents.to_vec(),
        }
    }

    fn link(target: &str) -> Node {
        Node::Symlink {
            target: target.to_string(),
        }
    }

    fn dir<const N: usize>(entries: [(&str, Node); N]) -> Node {
        Node::Directory(
            entries
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    }

    fn to_nar(node: &Node) -> Vec<u8> {
        let mut out = Vec::new();
        write_nar(&mut out, node).unwrap();
        out
    }

    fn validate(bytes: &[u8]) -> Result<NarSummary, NarError> {
        let mut v = NarValidator::new();
        v.feed(bytes)?;
        v.finish()
    }

    fn validate_bytewise(bytes: &[u8]) -> Result<NarSummary, NarError> {
        let mut v = NarValidator::new();
        for b in bytes {
            v.feed(std::slice::from_ref(b))?;
        }
        v.finish()
    }

    /// Expected summary of a tree, computed independently of the validator.
    fn summarise(node: &Node, s: &mut NarSummary) {
        match node {
            Node::Regular {
                executable,
                contents,
            } => {
                s.files += 1;
                s.executables += u64::from(*executable);
                s.contents_size += contents.len() as u64;
            }
            Node::Symlink { .. } => s.symlinks += 1,
            Node::Directory(entries) => {
                s.directories += 1;
                entries.values().for_each(|c| summarise(c, s));
            }
        }
    }

    fn expected_summary(node: &Node, nar_size: usize) -> NarSummary {
        let mut s = NarSummary {
            nar_size: nar_size as u64,
            ..NarSummary::default()
        };
        summarise(node, &mut s);
        s
    }

    /// A NAR string, for hand-made NARs.
    fn s(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_str(&mut out, bytes);
        out
    }

    fn strings(parts: &[&[u8]]) -> Vec<u8> {
        parts.iter().flat_map(|p| s(p)).collect()
    }

    /// A directory NAR with the given entry names (each a empty regular file), unchecked.
    fn dir_nar(names: &[&[u8]]) -> Vec<u8> {
        let mut out = strings(&[NAR_MAGIC, b"(", b"type", b"directory"]);
        for name in names {
            out.extend(strings(&[
                b"entry",
                b"(",
                b"name",
                name,
                b"node",
                b"(",
                b"type",
                b"regular",
                b"contents",
                b"",
                b")",
                b")",
            ]));
        }
        out.extend(s(b")"));
        out
    }

    fn expected_tree() -> Node {
        dir([
            ("B", reg(false, b"x")),
            ("a", reg(false, b"hello\n")),
            ("a-b", reg(false, b"y")),
            ("a.b", reg(false, b"z")),
            (
                "dir",
                dir([
                    ("link", link("../a")),
                    ("sub", dir([("deep", reg(false, b"deep file\n"))])),
                ]),
            ),
            ("eight", reg(false, b"12345678")),
            ("empty", reg(false, b"")),
            ("emptydir", dir([])),
            ("run", reg(true, b"#!/bin/sh\nexit 0\n")),
        ])
    }

    #[test]
    fn real_nix_vectors_parse_validate_and_round_trip() {
        let cases: [(&[u8], Node); 6] = [
            (REGULAR, reg(false, b"hello\n")),
            (EXECUTABLE, reg(true, b"#!/bin/sh\necho hi\n")),
            (SYMLINK, link("some/target")),
            (EMPTY, reg(false, b"")),
            (EMPTYDIR, dir([])),
            (TREE, expected_tree()),
        ];
        for (bytes, tree) in cases {
            assert_eq!(parse_nar(bytes).unwrap(), tree);
            let summary = expected_summary(&tree, bytes.len());
            assert_eq!(validate(bytes).unwrap(), summary);
            assert_eq!(validate_bytewise(bytes).unwrap(), summary);
            assert_eq!(to_nar(&tree), bytes);
        }
    }

    #[test]
    fn real_nix_vectors_are_the_committed_bytes() {
        // Guards the vectors themselves (sha256 as listed in testdata/nar/README.md).
        let tree_hash = hex::encode(Sha256::digest(TREE));
        assert_eq!(
            tree_hash,
            "0d43de076b27e58870d153a6dbf9464ed8f3ab23d35741c36f98999cfee5bd08"
        );
        let s = validate(TREE).unwrap();
        assert_eq!(
            (s.files, s.executables, s.directories, s.symlinks),
            (8, 1, 4, 1)
        );
        assert_eq!(s.nar_size, 2376);
    }

    #[test]
    fn hand_made_regular_file_layout() {
        let nar = to_nar(&reg(true, b"abc"));
        let want = strings(&[
            NAR_MAGIC,
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"",
            b"contents",
            b"abc",
            b")",
        ]);
        assert_eq!(nar, want);
        assert_eq!(nar.len(), 24 + 16 + 16 + 16 + 24 + 8 + 16 + 16 + 16);
    }

    #[test]
    fn bad_magic() {
        let mut nar = to_nar(&reg(false, b"x"));
        nar[8] = b'N';
        assert_eq!(validate(&nar), Err(NarError::BadMagic { offset: 0 }));
        // Wrong length: rejected from the length alone.
        assert_eq!(
            validate(&s(b"nix-archive-2x")),
            Err(NarError::BadMagic { offset: 0 })
        );
        assert_eq!(validate(&[]), Err(NarError::Truncated { offset: 0 }));
        assert!(matches!(
            parse_nar(b"\x0d\0\0\0\0\0\0\0nix-archive-2\0\0\0"),
            Err(NarError::BadMagic { .. })
        ));
    }

    #[test]
    fn unsorted_and_duplicate_entries() {
        let nar = dir_nar(&[b"b", b"a"]);
        assert!(matches!(
            validate(&nar),
            Err(NarError::UnsortedEntries { ref prev, ref name, .. }) if prev == "b" && name == "a"
        ));
        let nar = dir_nar(&[b"a", b"a"]);
        assert!(matches!(
            validate(&nar),
            Err(NarError::UnsortedEntries { ref prev, ref name, .. }) if prev == "a" && name == "a"
        ));
        // Byte order, not case-insensitive or locale order: "B" < "a", "a" < "a-b" < "a.b".
        assert!(validate(&dir_nar(&[b"B", b"a", b"a-b", b"a.b", b"ab"])).is_ok());
        assert!(matches!(
            validate(&dir_nar(&[b"a", b"B"])),
            Err(NarError::UnsortedEntries { .. })
        ));
        // The sort check is per directory: a nested directory starts afresh.
        let nested = dir([("z", dir([("a", reg(false, b""))])), ("zz", dir([]))]);
        assert!(validate(&to_nar(&nested)).is_ok());
    }

    #[test]
    fn unsorted_entry_offset_points_at_the_name() {
        let nar = dir_nar(&[b"b", b"a"]);
        let Err(NarError::UnsortedEntries { offset, .. }) = validate(&nar) else {
            panic!("expected UnsortedEntries");
        };
        let offset = offset as usize;
        assert_eq!(&nar[offset..offset + 9], &s(b"a")[..9]);
    }

    #[test]
    fn invalid_names() {
        for name in [&b"."[..], b"..", b"a/b", b"", b"/", b"a\0b"] {
            let nar = dir_nar(&[name]);
            assert!(
                matches!(validate(&nar), Err(NarError::InvalidName { .. })),
                "name {name:?}: {:?}",
                validate(&nar)
            );
        }
        // Names that merely look odd are fine.
        assert!(validate(&dir_nar(&[b"...", b".a", b"a..", b"\xff"])).is_ok());
    }

    #[test]
    fn too_long_name_and_target() {
        let long = vec![b'a'; 256];
        assert!(matches!(
            validate(&dir_nar(&[&long])),
            Err(NarError::TooLong {
                len: 256,
                max: 255,
                ..
            })
        ));
        assert!(validate(&dir_nar(&[&long[..255]])).is_ok());
        let target = vec![b'a'; 4097];
        let nar = strings(&[
            NAR_MAGIC, b"(", b"type", b"symlink", b"target", &target, b")",
        ]);
        assert!(matches!(
            validate(&nar),
            Err(NarError::TooLong { len: 4097, .. })
        ));
        assert!(matches!(
            validate(&strings(&[NAR_MAGIC, &[b'('; 17]])),
            Err(NarError::UnexpectedToken { .. })
        ));
    }

    #[test]
    fn invalid_targets() {
        for target in [&b""[..], b"a\0b"] {
            let nar = strings(&[
                NAR_MAGIC, b"(", b"type", b"symlink", b"target", target, b")",
            ]);
            assert!(matches!(
                validate(&nar),
                Err(NarError::InvalidTarget { .. })
            ));
        }
    }

    #[test]
    fn non_utf8_is_valid_nar_but_not_a_tree() {
        let nar = dir_nar(&[b"\xff"]);
        assert!(validate(&nar).is_ok());
        assert!(matches!(
            parse_nar(&nar),
            Err(NarError::NonUtf8 {
                what: "entry name",
                ..
            })
        ));
    }

    #[test]
    fn truncated_at_every_prefix() {
        let tree = dir([
            ("a", reg(true, b"hello")),
            ("b", link("a")),
            ("c", dir([("d", reg(false, b""))])),
        ]);
        let nar = to_nar(&tree);
        for len in 0..nar.len() {
            let prefix = &nar[..len];
            assert_eq!(
                validate(prefix),
                Err(NarError::Truncated { offset: len as u64 }),
                "prefix {len}"
            );
            assert_eq!(
                validate_bytewise(prefix),
                Err(NarError::Truncated { offset: len as u64 })
            );
            assert_eq!(
                parse_nar(prefix),
                Err(NarError::Truncated { offset: len as u64 })
            );
        }
        assert!(validate(&nar).is_ok());
    }

    #[test]
    fn trailing_data() {
        let mut nar = to_nar(&reg(false, b"x"));
        let len = nar.len() as u64;
        nar.push(0);
        assert_eq!(validate(&nar), Err(NarError::TrailingData { offset: len }));
        assert_eq!(
            validate_bytewise(&nar),
            Err(NarError::TrailingData { offset: len })
        );
        // Two NARs back to back are not one NAR.
        let twice = [to_nar(&reg(false, b"x")), to_nar(&reg(false, b"x"))].concat();
        assert_eq!(
            validate(&twice),
            Err(NarError::TrailingData { offset: len })
        );
        // Trailing data in a later feed call.
        let mut v = NarValidator::new();
        v.feed(&nar[..len as usize]).unwrap();
        assert!(v.is_done());
        assert_eq!(v.feed(b"x"), Err(NarError::TrailingData { offset: len }));
        assert_eq!(v.finish(), Err(NarError::TrailingData { offset: len }));
    }

    #[test]
    fn non_zero_padding() {
        // In a token ("(" at offset 24, its padding at 33..40).
        let mut nar = to_nar(&reg(false, b"x"));
        nar[35] = 1;
        assert_eq!(validate(&nar), Err(NarError::NonZeroPadding { offset: 35 }));
        // In file contents padding: "x" is the last byte before 7 padding bytes and ")".
        let mut nar = to_nar(&reg(false, b"x"));
        let pad_at = nar.len() - 16 - 3;
        nar[pad_at] = 0xff;
        assert_eq!(
            validate_bytewise(&nar),
            Err(NarError::NonZeroPadding {
                offset: pad_at as u64
            })
        );
        // In the magic's padding.
        let mut nar = to_nar(&reg(false, b"x"));
        nar[23] = b' ';
        assert_eq!(validate(&nar), Err(NarError::NonZeroPadding { offset: 23 }));
    }

    #[test]
    fn unknown_type_and_unexpected_tokens() {
        let nar = strings(&[NAR_MAGIC, b"(", b"type", b"fifo", b")"]);
        assert_eq!(
            validate(&nar),
            Err(NarError::UnknownType {
                offset: 56,
                found: "fifo".into()
            })
        );
        let nar = strings(&[NAR_MAGIC, b"[", b"type", b"regular", b"contents", b"", b")"]);
        assert_eq!(
            validate(&nar),
            Err(NarError::UnexpectedToken {
                offset: 24,
                expected: "\"(\"",
                found: "[".into()
            })
        );
        // "executable" must come before "contents", with an empty value.
        let nar = strings(&[
            NAR_MAGIC,
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"yes",
            b"contents",
            b"",
            b")",
        ]);
        assert!(matches!(
            validate(&nar),
            Err(NarError::UnexpectedToken {
                expected: "\"\"",
                ..
            })
        ));
        let nar = strings(&[
            NAR_MAGIC,
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"",
            b"executable",
            b"",
            b")",
        ]);
        assert!(matches!(
            validate(&nar),
            Err(NarError::UnexpectedToken {
                expected: "\")\"",
                ..
            })
        ));
        // A symlink entry in a regular file, a target in a directory.
        let nar = strings(&[
            NAR_MAGIC,
            b"(",
            b"type",
            b"directory",
            b"target",
            b"x",
            b")",
        ]);
        assert!(matches!(
            validate(&nar),
            Err(NarError::UnexpectedToken {
                expected: "\"entry\" or \")\"",
                ..
            })
        ));
    }

    #[test]
    fn errors_are_sticky() {
        let mut v = NarValidator::new();
        let err = v.feed(&s(b"not-a-nar-at-all")).unwrap_err();
        assert_eq!(err, NarError::BadMagic { offset: 0 });
        assert_eq!(v.feed(&[]), Err(err.clone()));
        assert_eq!(v.feed(b"more"), Err(err.clone()));
        assert_eq!(v.finish(), Err(err));
    }

    #[test]
    fn huge_declared_size_is_not_allocated() {
        let mut nar = strings(&[NAR_MAGIC, b"(", b"type", b"regular", b"contents"]);
        nar.extend_from_slice(&(1u64 << 60).to_le_bytes());
        nar.extend_from_slice(&[7; 100]);
        assert_eq!(
            validate(&nar),
            Err(NarError::Truncated {
                offset: nar.len() as u64
            })
        );
        assert_eq!(
            parse_nar(&nar),
            Err(NarError::Truncated {
                offset: nar.len() as u64
            })
        );
    }

    #[test]
    fn depth_is_bounded() {
        let mut nar = s(NAR_MAGIC);
        for _ in 0..MAX_DEPTH {
            nar.extend(strings(&[
                b"(",
                b"type",
                b"directory",
                b"entry",
                b"(",
                b"name",
                b"d",
                b"node",
            ]));
        }
        nar.extend(strings(&[b"(", b"type", b"directory"]));
        assert!(matches!(
            validate(&nar),
            Err(NarError::TooDeep { max: MAX_DEPTH, .. })
        ));
    }

    #[test]
    fn writer_rejects_misuse_and_invalid_trees() {
        // Invalid names and targets in a tree.
        for bad in [
            dir([("a/b", reg(false, b""))]),
            dir([("..", reg(false, b""))]),
            dir([("", reg(false, b""))]),
            link(""),
        ] {
            let err = write_nar(&mut Vec::new(), &bad).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        // Out-of-order entries through the streaming writer; nothing of the bad call is written.
        let mut w = NarWriter::new(Vec::new());
        w.begin_directory().unwrap();
        w.entry(b"b").unwrap();
        w.symlink(b"x").unwrap();
        w.end_entry().unwrap();
        let before = w.w.len();
        assert_eq!(
            w.entry(b"a").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(w.w.len(), before);
        assert!(w.end_directory().is_err(), "writer stays failed");

        // Contents longer or shorter than declared.
        let mut w = NarWriter::new(Vec::new());
        w.regular(false, 3).unwrap();
        assert!(w.write_contents(b"abcd").is_err());
        w.write_contents(b"ab").unwrap();
        assert!(w.end_regular().is_err());
        assert!(w.symlink(b"x").is_err());
        w.write_contents(b"c").unwrap();
        w.end_regular().unwrap();
        let (bytes, summary) = w.finish().unwrap();
        assert_eq!(parse_nar(&bytes).unwrap(), reg(false, b"abc"));
        assert_eq!(summary.nar_size, bytes.len() as u64);

        // Incomplete NAR, and calls out of grammar order.
        let mut w = NarWriter::new(Vec::new());
        w.begin_directory().unwrap();
        assert!(w.finish().is_err());
        let mut w = NarWriter::new(Vec::new());
        assert!(w.entry(b"a").is_err());
        let w = NarWriter::new(Vec::new());
        assert!(w.finish().is_err());
    }

    #[test]
    fn streaming_writer_matches_write_nar() {
        let mut w = NarWriter::new(Vec::new());
        w.begin_directory().unwrap();
        w.entry(b"big").unwrap();
        w.regular(true, 20).unwrap();
        for piece in [&b"0123456"[..], b"", b"789abcdefghij"] {
            w.write_contents(piece).unwrap();
        }
        w.end_regular().unwrap();
        w.end_entry().unwrap();
        w.entry(b"l").unwrap();
        w.symlink(b"big").unwrap();
        w.end_entry().unwrap();
        w.end_directory().unwrap();
        let (bytes, summary) = w.finish().unwrap();
        let tree = dir([
            ("big", reg(true, b"0123456789abcdefghij")),
            ("l", link("big")),
        ]);
        assert_eq!(bytes, to_nar(&tree));
        assert_eq!(summary, expected_summary(&tree, bytes.len()));
    }

    #[test]
    fn visitor_sees_contents_in_pieces_without_copies() {
        #[derive(Default)]
        struct Count {
            pieces: usize,
            bytes: u64,
            events: Vec<String>,
        }
        impl NarVisitor for Count {
            fn directory(&mut self) {
                self.events.push("dir".into());
            }
            fn entry(&mut self, name: &[u8]) {
                self.events.push(format!("entry {}", lossy(name)));
            }
            fn end_directory(&mut self) {
                self.events.push("end dir".into());
            }
            fn regular(&mut self, executable: bool, size: u64) {
                self.events.push(format!("file {executable} {size}"));
            }
            fn contents(&mut self, data: &[u8]) {
                assert!(!data.is_empty());
                self.pieces += 1;
                self.bytes += data.len() as u64;
            }
            fn end_regular(&mut self) {
                self.events.push("end file".into());
            }
            fn symlink(&mut self, target: &[u8]) {
                self.events.push(format!("symlink {}", lossy(target)));
            }
        }
        let contents = vec![0xabu8; 1 << 20];
        let nar = to_nar(&dir([
            ("f", reg(false, &contents)),
            ("g", reg(false, b"")),
            ("s", link("f")),
        ]));
        let mut v = NarValidator::new();
        let mut count = Count::default();
        for chunk in nar.chunks(64 * 1024) {
            v.feed_with(chunk, &mut count).unwrap();
        }
        v.finish().unwrap();
        assert_eq!(count.bytes, 1 << 20);
        assert_eq!(count.pieces, 17, "one call per fed slice touching the file");
        assert_eq!(
            count.events,
            [
                "dir",
                "entry f",
                "file false 1048576",
                "end file",
                "entry g",
                "file false 0",
                "end file",
                "entry s",
                "symlink f",
                "end dir"
            ]
        );
    }

    fn arb_name() -> impl Strategy<Value = String> {
        "[ab.\\-]{1,3}".prop_filter("not . or ..", |n| n != "." && n != "..")
    }

    fn arb_node() -> impl Strategy<Value = Node> {
        let leaf = prop_oneof![
            (any::<bool>(), prop::collection::vec(any::<u8>(), 0..40)).prop_map(
                |(executable, contents)| Node::Regular {
                    executable,
                    contents
                }
            ),
            "[a-z./]{1,12}".prop_map(|target| Node::Symlink { target }),
            Just(Node::Directory(BTreeMap::new())),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop::collection::btree_map(arb_name(), inner, 0..6).prop_map(Node::Directory)
        })
    }

    /// Splits `bytes` at the given (sorted, deduplicated) cut points.
    fn pieces<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut out = Vec::new();
        let mut start = 0;
        for c in cuts {
            out.push(&bytes[start..c]);
            start = c;
        }
        out.push(&bytes[start..]);
        out
    }

    fn validate_pieces(bytes: &[u8], cuts: &[usize]) -> Result<NarSummary, NarError> {
        let mut v = NarValidator::new();
        for p in pieces(bytes, cuts) {
            v.feed(p)?;
        }
        v.finish()
    }

    proptest! {
        #[test]
        fn round_trip(tree in arb_node(), cuts in prop::collection::vec(any::<usize>(), 0..20)) {
            let nar = to_nar(&tree);
            let summary = expected_summary(&tree, nar.len());
            prop_assert_eq!(validate_pieces(&nar, &cuts), Ok(summary));
            prop_assert_eq!(validate_bytewise(&nar), Ok(summary));
            prop_assert_eq!(parse_nar(&nar), Ok(tree));
        }

        #[test]
        fn split_independent_on_corrupt_input(
            tree in arb_node(),
            flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cuts in prop::collection::vec(any::<usize>(), 0..20),
        ) {
            let mut nar = to_nar(&tree);
            for (at, x) in flips {
                let i = at % nar.len();
                nar[i] ^= x;
            }
            let whole = validate(&nar);
            prop_assert_eq!(&validate_pieces(&nar, &cuts), &whole);
            prop_assert_eq!(&validate_bytewise(&nar), &whole);
            // Whatever the validator accepts with UTF-8 names, parse_nar accepts, and it writes
            // back the same bytes.
            if let Ok(node) = parse_nar(&nar) {
                prop_assert!(whole.is_ok());
                prop_assert_eq!(to_nar(&node), nar);
            }
        }
    }
}
