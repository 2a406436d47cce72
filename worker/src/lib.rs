//! The worker's sandbox as a library, so that tests apply it to a probe process and check
//! what it forbids (`tests/tests/sandbox.rs`). Its seccomp part is `core_server_proto::seccomp`,
//! which the ACME helper applies too.

pub mod sandbox;
