//! The operator interface: a small HTTP/1.1 endpoint on the node
//! ([`http`]), the client the CLI uses to talk to it ([`client`]) and the
//! renderings the CLI prints ([`render`]).
//!
//! ```text
//! nvmirror status ──request()──► AdminServer ──► AdminHandler (the node)
//!                                  accept thread ─► one short-lived thread per connection
//! ```
//!
//!
//! The routes, the HTTP subset and the bounds are in [`http`].

pub mod client;
pub mod handler;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod render;
mod request;
mod response;
mod routes;

pub use client::{request, AdminClientError};
pub use http::{AdminHandler, AdminRefusal, AdminServer};
pub use render::{human_bytes, human_duration_ms, render_action, render_status};
