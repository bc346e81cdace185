//! `berth connect`: a directory of the user's laptop, mounted at the same path in her
//! container, carried over her own SSH connection.
//!
//! Two ends speak [`proto`] over the byte stream of one SSH channel (a subsystem the daemon
//! serves):
//!
//! - the laptop (`berth connect`) *serves* the directory ([`serve`]): every path is resolved
//!   beneath the directory the user named, so nothing in the container can reach the rest of
//!   the laptop (`..`, absolute symlinks and symlinks out are kept inside);
//! - the daemon *asks* ([`client`]): its FUSE file system turns the kernel's requests from
//!   processes in the container into requests on the wire.
//!
//! The daemon is the side that must survive a hostile peer: every request has a deadline,
//! the requests in flight and every frame are bounded.

pub mod client;
pub mod proto;
pub mod serve;
pub mod target;
