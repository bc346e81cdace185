pub mod completions;
pub mod config;
pub mod connect;
pub mod daemon;
pub mod image;
pub mod manual;
pub mod purge;
pub mod status;
pub mod user;

use std::path::PathBuf;

use berth_proto::AdminClient;

use crate::Failure;

/// The admin client for the daemon whose state directory is `state_dir` (default
/// `/var/lib/berth`).
pub fn client(state_dir: Option<PathBuf>) -> AdminClient {
    let dir = state_dir.unwrap_or_else(|| PathBuf::from(berth_daemon::config::DEFAULT_STATE_DIR));
    AdminClient::new(dir.join(berth_proto::ADMIN_SOCKET))
}

/// Runs one async client call on a small runtime.
pub fn block_on<T>(f: impl Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(format!("cannot start the async runtime: {e}")))?
        .block_on(f)
}
