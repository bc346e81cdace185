//! `berth connect` on the daemon's side: a directory of the user's laptop, mounted in her
//! container, every file operation carried over her SSH connection as a request on the wire
//! ([`berth_connect::proto`]) to the laptop.
//!
//! [`fs`] is the FUSE file system (the kernel's requests turned into calls of a
//! [`berth_connect::client::Client`]); [`inodes`] is its table of inode numbers and paths,
//! [`dircache`] the listings it keeps.

mod dircache;
pub mod fs;
mod inodes;
#[cfg(test)]
mod laptop;

pub use fs::{ConnectFs, FuseSession, run};
