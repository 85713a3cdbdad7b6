//! Transport for ftvm: the versioned frame format shared by log files, the
//! log channel and the witness protocol.

pub mod frame;
