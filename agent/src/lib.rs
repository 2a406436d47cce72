//! The tunnel agent, for apps that are not on core-server's machine.
//!
//! Not written yet: it arrives with the tunnel issue. The agent will dial out to core-server's
//! worker on port 443, prove it may serve a domain, and serve requests over the reversed
//! HTTP/2 connection. This library will let a Rust program run an agent in-process.
