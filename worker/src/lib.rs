//! The worker's parts that other programs use too: the sandbox, which the ACME helper applies
//! the same way and which tests apply to a probe process to check what it forbids.

pub mod sandbox;
