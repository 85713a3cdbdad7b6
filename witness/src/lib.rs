//! The witness service and its client.
#![forbid(unsafe_code)]
