//! Firecracker's control plane for pvm: its JSON models ([`models`]) mapped onto
//! [`crate::config::VmConfig`], for the config file and for the HTTP API on a Unix socket.

pub mod models;
