//! End-to-end tests of the HTTP API: a real server on a loopback port over a real SQLite
//! file, driven with a real HTTP client.

mod auth;
mod common;
mod core_api;
mod identity_cache;
mod logs;
mod reviews;
mod search;
mod security;
mod tools;
