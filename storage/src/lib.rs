//! Virtual disk images.
#![forbid(unsafe_code)]
