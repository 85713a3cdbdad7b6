//! Transport for ftvm: the versioned frame format shared by log files, the
//! log channel and the witness protocol; QUIC endpoints with mutual TLS; and
//! the development PKI (`ftvm certs`).

pub mod frame;
pub mod pki;
pub mod quic;

/// Re-exported so users of [`quic`] need no quinn dependency of their own
/// (and cannot pull in quinn's default crypto provider by accident).
pub use quinn;
pub use rustls;
