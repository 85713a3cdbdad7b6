//! Witness service configuration (see the witness crate).
