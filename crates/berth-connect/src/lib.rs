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

/// Sets up glibc's allocator for the laptop's end, a process that moves 256 KiB frames for as
/// long as it runs; called before its runtime starts threads.
///
/// Buffers up to 1 MiB (a frame, a read of the file) come from the heap, and the heap keeps
/// up to 8 MiB free at its top: glibc's defaults gave each frame pages of its own or shrank
/// the heap after it, and refilled them with page faults (1 GiB read through the mount:
/// 0.85–2.0 s of this process's CPU before, 0.7–0.8 s after).
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; thread-safe in glibc.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}
