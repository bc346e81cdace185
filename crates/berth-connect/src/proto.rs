//! The wire of `berth connect`: length-delimited frames (a 4-byte big-endian length, then a
//! postcard-encoded message), over the byte stream of one SSH channel.
//!
//! 1. The laptop sends [`ToDaemon::Hello`] with the absolute path to mount at (the
//!    directory's own path on the laptop).
//! 2. The daemon answers [`ToLaptop::Welcome`] once the mount is in the container, or
//!    [`ToLaptop::Refused`] with one line saying why (nothing was mounted).
//! 3. From then on the daemon sends [`ToLaptop::Request`]s and the laptop answers each with a
//!    [`ToDaemon::Reply`] carrying the same id, in any order; several are in flight at once.
//!
//! Paths on the wire are relative to the served directory ([`RelPath`]); the laptop resolves
//! them beneath it. Errors are Linux `errno` values, as both ends run Linux.

use serde::{Deserialize, Serialize};
pub use serde_bytes::ByteBuf;
use tokio_util::codec::LengthDelimitedCodec;

/// Bumped on any incompatible change; both ends refuse another.
pub const VERSION: u32 = 5;

/// The SSH subsystem the daemon serves mounts on.
pub const SUBSYSTEM: &str = "berth-connect@berth";

/// The most bytes one read or write carries.
pub const MAX_IO: u32 = 256 * 1024;

/// The largest frame either end accepts: one I/O plus its request (paths are at most
/// `PATH_MAX` each, two of them for a rename).
pub const MAX_FRAME: usize = MAX_IO as usize + 16 * 1024;

/// The most bytes of entries one readdir answer carries (names and attributes, roughly).
pub const READDIR_BYTES: usize = 64 * 1024;

/// The longest file an [`Op::Open`] may ask to have whole with its handle.
pub const MAX_HEAD: u32 = 64 * 1024;

/// The codec both ends use.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// Encodes a message as one frame's payload.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(msg)
}

/// Encodes a message as one whole frame: its 4-byte big-endian length, then the payload (what
/// [`codec`] sends for [`encode`]'s payload), in one buffer, so it can go on the byte stream
/// as it is. A payload longer than [`MAX_FRAME`] is refused, as [`codec`] refuses it.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<bytes::Bytes, postcard::Error> {
    let len = postcard::experimental::serialized_size(msg)?;
    if len > MAX_FRAME {
        return Err(postcard::Error::SerializeBufferFull);
    }
    // MAX_FRAME fits in the 4 bytes; the buffer is sized once, so the payload is copied once.
    let mut frame = Vec::with_capacity(4 + len);
    frame.extend_from_slice(&(len as u32).to_be_bytes());
    Ok(bytes::Bytes::from(postcard::to_extend(msg, frame)?))
}

/// Decodes one frame's payload; trailing bytes are an error.
pub fn decode<'a, T: Deserialize<'a>>(frame: &'a [u8]) -> Result<T, postcard::Error> {
    let (msg, rest) = postcard::take_from_bytes(frame)?;
    if rest.is_empty() {
        Ok(msg)
    } else {
        Err(postcard::Error::DeserializeBadEncoding)
    }
}

/// A path beneath the served directory: its components joined by `/`, no leading or
/// trailing `/`, no `.` or `..`, no empty component, no NUL; the empty path is the directory
/// itself. Bytes, not UTF-8: file names are bytes on Linux.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RelPath(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl RelPath {
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// Whether the path has the shape above (the laptop refuses any other with `EINVAL`).
    pub fn is_valid(&self) -> bool {
        self.0.is_empty()
            || (self.0.len() < 4096
                && self
                    .0
                    .split(|&b| b == b'/')
                    .all(|c| !c.is_empty() && c != b"." && c != b".." && !c.contains(&0)))
    }

    /// `self/name`; `None` when `name` is not one valid component.
    pub fn join(&self, name: &[u8]) -> Option<Self> {
        if name.is_empty()
            || name == b"."
            || name == b".."
            || name.contains(&b'/')
            || name.contains(&0)
        {
            return None;
        }
        let mut p = self.0.clone();
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(name);
        Some(Self(p))
    }
}

/// Seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

/// What a setattr sets a timestamp to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetTime {
    Now,
    At(Time),
}

/// A file's attributes as `lstat(2)` gives them on the laptop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    /// 512-byte blocks.
    pub blocks: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    /// Type and permission bits (`st_mode`).
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub blksize: u32,
}

/// The attributes of the directory a change was made in, read (`fstat` of the directory's
/// descriptor the change used) just after it. The laptop numbers these reads in one sequence
/// for the mount, each read and its number taken together: of two for the same directory,
/// the one with the higher `seq` was read later, whatever order the answers come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DirAfter {
    pub seq: u64,
    pub attr: Attr,
}

/// `statfs(2)` of the served directory's file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// One directory entry; `offset` is what to pass to the next [`Op::Readdir`] to go on after
/// it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    pub offset: u64,
    /// `lstat` of the entry (readdirplus); `None` if it vanished meanwhile.
    pub attr: Option<Attr>,
}

/// A request from the daemon. `fh` values are the laptop's, from [`Answer::Handle`] or
/// [`Answer::Created`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `lstat`. → [`Answer::Attr`]
    Lookup { path: RelPath },
    /// `fstat` of `fh` when given, else `lstat` of `path`. → [`Answer::Attr`]
    Getattr { path: RelPath, fh: Option<u64> },
    /// Each field that is `Some` is set (`size` truncates; on `fh` when given). Ownership
    /// is not carried: files on the laptop belong to its user. → [`Answer::Attr`]
    Setattr {
        path: RelPath,
        fh: Option<u64>,
        mode: Option<u32>,
        size: Option<u64>,
        atime: Option<SetTime>,
        mtime: Option<SetTime>,
    },
    /// → [`Answer::Bytes`]
    Readlink { path: RelPath },
    /// → [`Answer::Entry`]
    Mkdir { path: RelPath, mode: u32 },
    /// → [`Answer::Removed`]
    Unlink { path: RelPath },
    /// → [`Answer::Removed`]
    Rmdir { path: RelPath },
    /// `path` becomes a symlink to `target` (stored as given). → [`Answer::Entry`]
    Symlink {
        path: RelPath,
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    /// `renameat2` with its flags (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`).
    /// → [`Answer::Renamed`]
    Rename {
        from: RelPath,
        to: RelPath,
        flags: u32,
    },
    /// A hard link `to` of `from`. → [`Answer::Entry`]
    Link { from: RelPath, to: RelPath },
    /// `open` with Linux `O_*` flags (no `O_CREAT`). With `head` > 0, a regular file with
    /// one name (`st_nlink` 1) opened for reading of at most `head` bytes (and [`MAX_HEAD`])
    /// comes whole with its handle: opened and read in one round trip.
    /// → [`Answer::Opened`]
    Open {
        path: RelPath,
        flags: i32,
        head: u32,
    },
    /// `open(O_CREAT | flags, mode)`. → [`Answer::Created`]
    Create {
        path: RelPath,
        flags: i32,
        mode: u32,
    },
    /// At most [`MAX_IO`] bytes; fewer only at the end of the file. → [`Answer::Data`]
    Read { fh: u64, offset: u64, size: u32 },
    /// → [`Answer::Written`]
    Write {
        fh: u64,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// → [`Answer::Done`]
    Fsync { fh: u64, datasync: bool },
    /// The handle is closed (file or directory). → [`Answer::Done`], or with `attr`
    /// [`Answer::Attr`]: the file's attributes just before it closed (`fstat`), when they
    /// could be read.
    Release { fh: u64, attr: bool },
    /// → [`Answer::Handle`]
    Opendir { path: RelPath },
    /// Entries after `offset` (0: from the start), at most about [`READDIR_BYTES`]; none
    /// at the end. → [`Answer::Entries`]
    Readdir { fh: u64, offset: u64 },
    /// → [`Answer::Statfs`]
    Statfs,
}

/// A successful answer; which one depends on the [`Op`]. An answer to a change of a
/// directory's entries carries that directory's attributes after it ([`DirAfter`]; `None`
/// when they could not be read; boxed, as most answers carry none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    Done,
    Attr(Attr),
    /// A new name: what it names, and its directory after.
    Entry {
        attr: Attr,
        dir: Option<Box<DirAfter>>,
    },
    /// A name gone (unlink, rmdir): its directory after.
    Removed {
        dir: Option<Box<DirAfter>>,
    },
    /// A rename: the directories of the old and the new name after (the same directory
    /// for both when it is one).
    Renamed {
        from: Option<Box<DirAfter>>,
        to: Option<Box<DirAfter>>,
    },
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
    Handle(u64),
    /// `head`: the whole file, when asked for and it is a regular file opened for reading
    /// and no longer than asked, as [`Op::Open`] says.
    Opened {
        fh: u64,
        head: Option<ByteBuf>,
    },
    Created {
        fh: u64,
        attr: Attr,
        dir: Option<Box<DirAfter>>,
    },
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    Written(u32),
    Entries(#[serde(deserialize_with = "bounded_entries")] Vec<DirEntry>),
    Statfs(Statfs),
}

/// The most entries one [`Answer::Entries`] may carry: a laptop gives about
/// [`READDIR_BYTES`] of them, 200 bytes an entry besides its name, so a few hundred. An
/// entry costs about 150 bytes decoded however few it took on the wire (3 with an empty
/// name and no attributes), so the count, not the frame's length, bounds what an answer
/// costs: refused past this before anything of it is made.
pub const MAX_ENTRIES: usize = 1024;

fn bounded_entries<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<DirEntry>, D::Error> {
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<DirEntry>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "at most {MAX_ENTRIES} directory entries")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let announced = seq.size_hint().unwrap_or(0);
            if announced > MAX_ENTRIES {
                return Err(serde::de::Error::invalid_length(announced, &self));
            }
            let mut out = Vec::with_capacity(announced);
            while let Some(e) = seq.next_element()? {
                if out.len() == MAX_ENTRIES {
                    return Err(serde::de::Error::invalid_length(out.len() + 1, &self));
                }
                out.push(e);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Bounded)
}

/// Daemon → laptop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToLaptop {
    Welcome {
        version: u32,
    },
    /// One line for the user; nothing was mounted.
    Refused {
        reason: String,
    },
    Request {
        id: u64,
        op: Op,
    },
}

/// Laptop → daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToDaemon {
    /// `path`: absolute, where the directory appears in the container (its laptop path).
    Hello {
        version: u32,
        #[serde(with = "serde_bytes")]
        path: Vec<u8>,
    },
    /// `Err` is an `errno`.
    Reply {
        id: u64,
        result: Result<Answer, i32>,
    },
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A whole frame is what the codec makes of the payload: the same bytes on the stream,
    /// and the same refusal of a payload past [`MAX_FRAME`].
    #[test]
    fn a_whole_frame_is_the_codec_s_frame() {
        use tokio_util::codec::Encoder;
        let write = |len: usize| ToLaptop::Request {
            id: 9,
            op: Op::Write {
                fh: 1,
                offset: 2,
                data: vec![7u8; len],
            },
        };
        let coded = |msg: &ToLaptop| {
            let mut out = bytes::BytesMut::new();
            codec()
                .encode(bytes::Bytes::from(encode(msg).unwrap()), &mut out)
                .map(|()| out.freeze())
        };
        for len in [0usize, 1, 300, MAX_IO as usize] {
            let msg = write(len);
            assert_eq!(
                encode_frame(&msg).unwrap(),
                coded(&msg).unwrap(),
                "{len} bytes"
            );
        }
        assert!(encode_frame(&write(MAX_FRAME)).is_err());
        assert!(coded(&write(MAX_FRAME)).is_err());
    }

    #[test]
    fn messages_round_trip_and_trailing_bytes_are_refused() {
        let msg = ToLaptop::Request {
            id: 7,
            op: Op::Write {
                fh: 3,
                offset: 1 << 33,
                data: vec![1, 2, 3],
            },
        };
        let bytes = encode(&msg).unwrap();
        assert_eq!(decode::<ToLaptop>(&bytes).unwrap(), msg);
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode::<ToLaptop>(&longer).is_err());
        assert!(decode::<ToLaptop>(&bytes[..bytes.len() - 1]).is_err());
    }

    /// A listing of tiny entries costs little on the wire and much decoded: past
    /// [`MAX_ENTRIES`] it is refused, whether the count announced says so or not.
    #[test]
    fn listings_past_the_entry_bound_are_refused() {
        let reply = |n: usize| ToDaemon::Reply {
            id: 1,
            result: Ok(Answer::Entries(vec![
                DirEntry {
                    name: Vec::new(),
                    offset: 0,
                    attr: None,
                };
                n
            ])),
        };
        let fits = encode(&reply(MAX_ENTRIES)).unwrap();
        assert_eq!(decode::<ToDaemon>(&fits).unwrap(), reply(MAX_ENTRIES));
        let past = encode(&reply(MAX_ENTRIES + 1)).unwrap();
        assert!(decode::<ToDaemon>(&past).is_err());
        // A frame of the wire's largest size, all 3-byte entries: refused at its count.
        let flood = encode(&reply(MAX_FRAME / 3)).unwrap();
        assert!(flood.len() <= MAX_FRAME + 16, "{}", flood.len());
        assert!(decode::<ToDaemon>(&flood).is_err());
    }

    #[test]
    fn data_is_carried_as_bytes_not_as_a_sequence() {
        let data = vec![0xffu8; 1000];
        let bytes = encode(&Answer::Data(data)).unwrap();
        // tag + varint length + the bytes themselves.
        assert!(bytes.len() <= 1000 + 4, "{}", bytes.len());
    }

    #[test]
    fn relative_paths_have_one_shape() {
        for good in [&b""[..], b"a", b"a/b", b"a b/\xc3\xa9", b"...", b".a"] {
            assert!(RelPath(good.to_vec()).is_valid(), "{good:?}");
        }
        for bad in [
            &b"/"[..],
            b"/a",
            b"a/",
            b"a//b",
            b"..",
            b"a/../b",
            b"./a",
            b"a\0b",
        ] {
            assert!(!RelPath(bad.to_vec()).is_valid(), "{bad:?}");
        }
        let root = RelPath::root();
        assert_eq!(root.join(b"a").unwrap().join(b"b").unwrap().0, b"a/b");
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0"] {
            assert!(root.join(bad).is_none());
        }
    }
}
