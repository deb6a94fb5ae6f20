//! Integration tests: one binary (links once), a real server per test.

mod auth;
mod helpers;
mod realtime;
mod rest;
